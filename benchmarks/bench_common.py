"""What every benchmark of this folder shares: the CPU allocator setting (--malloc), where the
JSON goes, and the machine record each JSON carries (versions, git commit, load, settings that
move timings), so that a number can be traced to the code and the conditions it came from."""
import datetime
import functools
import json
import os
import platform
import subprocess

import torch

import sficonv_ext
from sficonv_ext import ops
from sficonv_ext.cpu_allocator import keep_large_blocks_on_heap, large_block_cache

MALLOC_CHOICES = ("default", "no-mmap", "cache")
MALLOC_HELP = ("CPU allocation of large blocks. 'no-mmap': "
               "sficonv_ext.cpu_allocator.keep_large_blocks_on_heap() before anything is built "
               "(glibc: large tensors reused from the heap instead of mapped and page-faulted "
               "in again on every call); 'cache': the whole run inside "
               "sficonv_ext.cpu_allocator.large_block_cache(); 'default': glibc's own, under "
               "which a path that maps scratch buffers (oneDNN) pays page faults every call")


def set_malloc(mode, stack):
    """Apply the --malloc choice (``stack``: an ExitStack that holds the cache until the run
    ends); exits where it cannot be applied."""
    if mode == "no-mmap" and not keep_large_blocks_on_heap():
        raise SystemExit("--malloc no-mmap needs glibc's mallopt, which this C library lacks")
    if mode == "cache":
        try:
            stack.enter_context(large_block_cache())
        except RuntimeError as error:
            raise SystemExit(f"--malloc cache: {error}") from None


@functools.lru_cache(maxsize=None)  # once a run: the benchmarks save after every measurement
def _git_commit():
    folder = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder,
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def load_average():
    """The 1-minute load average (None where the OS has none): above the core count, timings
    of this run share the machine with other work."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def warn_if_loaded():
    """The load average, with a warning printed when it exceeds the core count: every CPU
    timing of the run then shares the cores (an OpenMP thread descheduled mid-region stalls
    the whole region), and a median does not protect against that."""
    load = load_average()
    cores = os.cpu_count() or 1
    if load is not None and load > cores:
        print(f"warning: load average {load} on {cores} cores: other work shares this machine, "
              f"CPU timings of this run are not comparable", flush=True)
    return load


def machine_info(device):
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "sficonv_ext": sficonv_ext.__version__, "git_commit": _git_commit(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": load_average(), "backends": ops.backends(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = {"version": torch.backends.cudnn.version(),
                         "benchmark": torch.backends.cudnn.benchmark,
                         "allow_tf32": torch.backends.cudnn.allow_tf32}
    return info


def result_path(explicit, name):
    """Where a benchmark writes its JSON: ``explicit`` (--json), else runs/bench/name in the
    checkout (ignored by git: a plain run never overwrites the committed results in
    benchmarks/results/, which are copied there by hand with their provenance). The folder is
    created."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = explicit or os.path.join(repo, "runs", "bench", name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    return out


def write_json(path, result):
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
