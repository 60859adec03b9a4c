"""Shim: `imgclf.serve:main` keeps working; the serving entrypoint is imgclf.serving.serve."""

from imgclf.serving.serve import main

__all__ = ["main"]

if __name__ == "__main__":
    import sys

    sys.exit(main())
