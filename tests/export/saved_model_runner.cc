// Loads a SavedModel with tensorflow::LoadSavedModel (the loader TF Serving's
// model server is built on), runs one signature and writes its outputs.
//
//   saved_model_runner EXPORT_DIR SIGNATURE IO_DIR [OP_LIBRARY]
//
// IO_DIR/inputs.txt has one line per signature input,
//   <key> <dtype: float32|int32|int64> <rank> <dim>...
// with the little-endian values in IO_DIR/<key>.bin. Every output of the
// signature is written the same way (outputs.txt, <key>.out.bin). OP_LIBRARY
// is loaded with TF_LoadLibrary first, as a serving binary that links custom
// ops dynamically would. Exit codes: 0 ran; 2 the load failed; 3 the run
// failed; 4 bad arguments or files. Errors go to stderr with TF's message.

#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "tensorflow/c/c_api.h"
#include "tensorflow/cc/saved_model/loader.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/public/session.h"

namespace {

bool ParseDtype(const std::string& name, tensorflow::DataType* dtype) {
  if (name == "float32") *dtype = tensorflow::DT_FLOAT;
  else if (name == "int32") *dtype = tensorflow::DT_INT32;
  else if (name == "int64") *dtype = tensorflow::DT_INT64;
  else return false;
  return true;
}

const char* DtypeName(tensorflow::DataType dtype) {
  switch (dtype) {
    case tensorflow::DT_FLOAT: return "float32";
    case tensorflow::DT_INT32: return "int32";
    case tensorflow::DT_INT64: return "int64";
    default: return nullptr;
  }
}

int Fail(int code, const std::string& message) {
  std::cerr << message << std::endl;
  return code;
}

// Reads the inputs listed in IO_DIR/inputs.txt; false with `error` set when a
// line or a file does not match what it declares.
bool ReadInputs(const std::string& io_dir,
                std::vector<std::pair<std::string, tensorflow::Tensor>>* inputs,
                std::string* error) {
  std::ifstream manifest(io_dir + "/inputs.txt");
  if (!manifest) { *error = "cannot read " + io_dir + "/inputs.txt"; return false; }
  std::string line;
  while (std::getline(manifest, line)) {
    if (line.empty()) continue;
    std::istringstream fields(line);
    std::string key, dtype_name;
    int rank = -1;
    fields >> key >> dtype_name >> rank;
    tensorflow::DataType dtype;
    if (!fields || !ParseDtype(dtype_name, &dtype) || rank < 0 || rank > 8) {
      *error = "bad manifest line: " + line; return false;
    }
    tensorflow::TensorShape shape;
    for (int i = 0; i < rank; ++i) {
      int64_t dim = -1;
      fields >> dim;
      // AddDimWithStatus rejects negative sizes and element counts past 2^63.
      if (!fields || !shape.AddDimWithStatus(dim).ok()) {
        *error = "bad dimension in manifest line: " + line; return false;
      }
    }
    tensorflow::Tensor tensor(dtype, shape);
    const std::string path = io_dir + "/" + key + ".bin";
    std::ifstream data(path, std::ios::binary | std::ios::ate);
    if (!data) { *error = "cannot read " + path; return false; }
    const auto bytes = tensor.tensor_data().size();
    if (static_cast<size_t>(data.tellg()) != bytes) {
      *error = path + " does not hold " + std::to_string(bytes) + " bytes";
      return false;
    }
    data.seekg(0);
    data.read(const_cast<char*>(tensor.tensor_data().data()), bytes);
    inputs->emplace_back(key, std::move(tensor));
  }
  return true;
}

bool WriteOutput(const std::string& io_dir, const std::string& key,
                 const tensorflow::Tensor& tensor, std::ofstream* manifest) {
  const char* dtype = DtypeName(tensor.dtype());
  if (dtype == nullptr) return false;
  *manifest << key << " " << dtype << " " << tensor.dims();
  for (int i = 0; i < tensor.dims(); ++i) *manifest << " " << tensor.dim_size(i);
  *manifest << "\n";
  std::ofstream data(io_dir + "/" + key + ".out.bin", std::ios::binary);
  const auto bytes = tensor.tensor_data();
  data.write(bytes.data(), bytes.size());
  return static_cast<bool>(data);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    return Fail(4, "usage: saved_model_runner EXPORT_DIR SIGNATURE IO_DIR "
                   "[OP_LIBRARY]");
  }
  const std::string export_dir = argv[1], signature = argv[2], io_dir = argv[3];
  if (argc == 5) {
    TF_Status* status = TF_NewStatus();
    TF_Library* library = TF_LoadLibrary(argv[4], status);
    if (TF_GetCode(status) != TF_OK) {
      const std::string message = TF_Message(status);
      TF_DeleteStatus(status);
      return Fail(2, "TF_LoadLibrary failed: " + message);
    }
    TF_DeleteStatus(status);
    (void)library;  // Kept loaded: the kernels it registered are used below.
  }

  tensorflow::SavedModelBundle bundle;
  tensorflow::SessionOptions session_options;
  tensorflow::RunOptions run_options;
  const absl::Status loaded = tensorflow::LoadSavedModel(
      session_options, run_options, export_dir, {"serve"}, &bundle);
  if (!loaded.ok()) return Fail(2, "LoadSavedModel failed: " + loaded.ToString());

  const auto& signatures = bundle.meta_graph_def.signature_def();
  const auto found = signatures.find(signature);
  if (found == signatures.end()) return Fail(4, "no signature " + signature);
  const tensorflow::SignatureDef& def = found->second;

  std::vector<std::pair<std::string, tensorflow::Tensor>> inputs;
  std::string error;
  if (!ReadInputs(io_dir, &inputs, &error)) return Fail(4, error);
  std::vector<std::pair<std::string, tensorflow::Tensor>> feeds;
  for (auto& [key, tensor] : inputs) {
    const auto info = def.inputs().find(key);
    if (info == def.inputs().end()) return Fail(4, "signature has no input " + key);
    feeds.emplace_back(info->second.name(), tensor);
  }
  if (feeds.size() != static_cast<size_t>(def.inputs().size())) {
    return Fail(4, "inputs.txt does not list every input of " + signature);
  }
  std::vector<std::string> keys, fetches;
  for (const auto& [key, info] : def.outputs()) {
    keys.push_back(key);
    fetches.push_back(info.name());
  }
  std::vector<tensorflow::Tensor> outputs;
  const absl::Status ran = bundle.session->Run(feeds, fetches, {}, &outputs);
  if (!ran.ok()) return Fail(3, "Run failed: " + ran.ToString());

  std::ofstream manifest(io_dir + "/outputs.txt");
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!WriteOutput(io_dir, keys[i], outputs[i], &manifest)) {
      return Fail(4, "cannot write output " + keys[i]);
    }
  }
  return manifest ? 0 : Fail(4, "cannot write outputs.txt");
}
