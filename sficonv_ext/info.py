"""``python -m sficonv_ext.info``: print what was built and what will run."""
from .ops import _extension, backends


def main():
    info = backends()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    if not info["cpp"]:
        print("\nThe C++/CUDA extension is not loaded: pure-PyTorch (and Triton) paths are used."
              f"\nTo build it: {_extension.REBUILD_HINT}.")


if __name__ == "__main__":
    main()
