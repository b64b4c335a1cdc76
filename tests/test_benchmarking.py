"""benchmarking.cpu_info: what a benchmark's JSON records of the machine."""

from tf_blocksparse import benchmarking

# The head of /proc/cpuinfo on a KVM guest whose model name is generic.
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
cpu cores\t: 2
flags\t\t: fpu sse4_2 avx2 fma avx512f avx512bw avx512_bf16

processor\t: 1
vendor_id\t: SomethingElse
"""


def test_cpu_info_records_the_generation_behind_a_generic_model_name(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text(CPUINFO)
  info = benchmarking.cpu_info(str(path))
  assert info["cpu_model"] == "AMD EPYC"
  assert (info["cpu_vendor"], info["cpu_family"], info["cpu_model_number"],
          info["cpu_stepping"]) == ("AuthenticAMD", 26, 2, 1)
  assert info["cpu_cores_per_socket"] == 2
  assert info["cpu_flags"]["avx512f"] and info["cpu_flags"]["avx512_bf16"]
  assert not info["cpu_flags"]["amx_tile"]


def test_cpu_info_without_proc_cpuinfo(tmp_path):
  info = benchmarking.cpu_info(str(tmp_path / "missing"))
  assert info["cpu_family"] is None and info["cpu_model_number"] is None
  assert not any(info["cpu_flags"].values())
