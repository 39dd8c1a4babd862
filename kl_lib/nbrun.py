"""Entry point kept for ``python -m kl_lib.nbrun``; the notebook runner lives in ``kl_lib.study.nbrun``.

This file is the one exception to the layering rule (a top-level module importing from the study layer): it
holds no logic, only the command-line entry point that existing commands and documentation use.
"""

from kl_lib.study.nbrun import main

if __name__ == "__main__":
    raise SystemExit(main())
