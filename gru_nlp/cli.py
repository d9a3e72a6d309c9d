"""The ``gru-nlp`` command: ``fit|validate|test|predict`` through LightningCLI, and ``classify``.

Lightning and ``datasets`` are imported only for the training subcommands, so ``classify``
starts as fast as the inference API does.
"""

from __future__ import annotations

import sys

DESCRIPTION = (
    "Train and score a BiGRU text classifier: fit, validate, test and predict (LightningCLI; "
    "`gru-nlp fit --help`). Classify texts with a trained one: `gru-nlp classify --help`."
)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``gru-nlp`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "classify":
        from gru_nlp.classify import main as classify_main

        classify_main(argv[1:])
        return
    from gru_nlp.lightning_cli import run_cli

    # None lets LightningCLI read sys.argv itself (passing it as `args` makes Lightning warn).
    run_cli(args, parser_kwargs={"description": DESCRIPTION})


if __name__ == "__main__":
    main()
