"""Which errors raised by the extension crash the process, and where (a GPU machine's check).

On the GPU machines (torch 2.11, 2026-11-27 and -28) some errors raised by sficonv_ext._C
killed the process with a segfault instead of reaching Python as a RuntimeError. Moving them
from nvcc-compiled to g++-compiled code did not help (H200, 2026-11-28). Each case below runs
in a child process of its own, so that one crash does not hide the others, and prints
"raised", "no error" or "CRASHED (signal N)". A crash also prints the native stack: a small
SIGSEGV handler (compiled here with cc, loaded by LD_PRELOAD) writes backtrace_symbols_fd.

    python scripts/cuda_error_probe.py            # every case
    python scripts/cuda_error_probe.py --maps     # also the C++ runtimes the process loaded
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

# name -> (code run after `import torch, sficonv_ext`, environment added). Each raises (or
# not) one error; the cases differ in what the message formats (numbers or only strings),
# which code raises it (our g++ file, our nvcc file, torch itself) and whether CUDA is set up.
CAP = {"SFICONV_CUDA_TILE_MIN_BLOCKS": "3", "SFICONV_CUDA_NCHW_KERNEL": "tiles-pipelined"}
BOGUS = {"SFICONV_CUDA_NCHW_KERNEL": "bogus"}
CPU_MISMATCH = ("torch.ops.sficonv_ext.mcs_conv_forward(torch.randn(1, 2, 5, 5), "
                "torch.randn(3, 1, 3, 3), True, 1e-6)")
CUDA_INIT = "torch.zeros(1, device='cuda'); "
CASES = {
    "torch's own numbered error (view), CPU": ("torch.empty(2, 3).view(7)", {}),
    "torch's own numbered error (view), after CUDA set-up":
        (CUDA_INIT + "torch.empty(2, 3).view(7)", {}),
    "ours, string message, CPU op (config)": ("torch.ops.sficonv_ext.cuda_kernel_config()", BOGUS),
    "ours, numbered message, CPU op (config)": ("torch.ops.sficonv_ext.cuda_kernel_config()", CAP),
    "ours, numbered message, CPU op (config), after CUDA set-up":
        (CUDA_INIT + "torch.ops.sficonv_ext.cuda_kernel_config()", CAP),
    "ours, numbered message, CPU tensors (channel mismatch)": (CPU_MISMATCH, {}),
    "ours, numbered message, CPU tensors, after CUDA set-up": (CUDA_INIT + CPU_MISMATCH, {}),
    "ours, numbered message, CUDA tensors (channel mismatch)":
        (CPU_MISMATCH.replace("5, 5)", "5, 5, device='cuda')").replace(
            "3, 3)", "3, 3, device='cuda')"), {}),
    "ours, string message, CUDA op (config read in the op)":
        ("torch.ops.sficonv_ext.mcs_conv_forward(torch.randn(1, 2, 9, 16, device='cuda'), "
         "torch.rand(2, 1, 5, 5, device='cuda'), True, 1e-6)", BOGUS),
    "ours, numbered message, CUDA op (config read in the op)":
        ("torch.ops.sficonv_ext.mcs_conv_forward(torch.randn(1, 2, 9, 16, device='cuda'), "
         "torch.rand(2, 1, 5, 5, device='cuda'), True, 1e-6)", CAP),
}

HANDLER_C = r"""
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
static void on_fault(int sig) {
  void* frames[64];
  int n = backtrace(frames, 64);
  const char msg[] = "native stack at the fault:\n";
  write(2, msg, sizeof msg - 1);
  backtrace_symbols_fd(frames, n, 2);
  signal(sig, SIG_DFL);
  raise(sig);
}
__attribute__((constructor)) static void install(void) {
  signal(SIGSEGV, on_fault);
  signal(SIGABRT, on_fault);
}
"""

CHILD = """
import sys, torch, sficonv_ext
try:
    {code}
except Exception as e:
    print("raised", type(e).__name__ + ":", str(e).splitlines()[0][:160])
else:
    print("no error")
if {maps}:
    seen = set()
    for line in open("/proc/self/maps"):
        path = line.split()[-1]
        if ("libstdc++" in path or "libgcc_s" in path or "libc++" in path) and path not in seen:
            seen.add(path); print("  loaded:", path)
sys.stdout.flush()
"""


def build_handler(folder):
    """The SIGSEGV handler as a shared library, or None where no C compiler is found."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, lib = os.path.join(folder, "on_fault.c"), os.path.join(folder, "on_fault.so")
    with open(src, "w") as f:
        f.write(HANDLER_C)
    done = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", lib, src], capture_output=True)
    return lib if done.returncode == 0 else None


def run_case(code, env_extra, handler, maps, timeout):
    env = dict(os.environ, **env_extra)
    # The native stack from the preloaded handler, or else Python's own (faulthandler).
    flags = []
    if handler:
        env["LD_PRELOAD"] = handler
    else:
        flags = ["-X", "faulthandler"]
    child = CHILD.format(code=code, maps=maps)
    try:
        done = subprocess.run([sys.executable, *flags, "-c", child], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"TIMED OUT after {timeout} s", ""
    if done.returncode < 0:
        return f"CRASHED (signal {-done.returncode})", done.stderr
    if done.returncode != 0:
        return f"exit status {done.returncode}", done.stderr
    return done.stdout.strip(), ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", action="store_true", help="list the C++ runtimes loaded")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        handler = build_handler(folder)
        print("native stacks:", "yes" if handler else "no (no C compiler)")
        failed = 0  # crashed, timed out or exited with an error
        for name, (code, env_extra) in CASES.items():
            if args.only not in name:
                continue
            result, stderr = run_case(code, env_extra, handler, args.maps, args.timeout)
            print(f"{name}: {result}")
            failed += not (result.startswith("raised") or result.startswith("no error"))
            if stderr:
                # The native frames (and the Python error of a failed child), not the noise.
                keep = [ln for ln in stderr.splitlines()
                        if "(" in ln or "Error" in ln or "native stack" in ln]
                print("\n".join("    " + ln for ln in keep[:40]))
        print(f"{failed} case(s) crashed or failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
