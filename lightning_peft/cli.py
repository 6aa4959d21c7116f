"""The ``lightning-peft`` command: LightningCLI in subclass mode, plus a test run after ``fit``.

    lightning-peft fit --config configs/quickstart.yaml
    lightning-peft fit --config configs/vit_digits.yaml --trainer.max_steps=20
    lightning-peft fit --config configs/quickstart.yaml --test_after_fit false
    lightning-peft merge --base <model dir | config.yaml> --adapter <export dir> --out <dir>
    lightning-peft inspect <export dir | checkpoint> [--json]

Any LightningModule / LightningDataModule can be named with ``class_path`` (``model:`` and
``data:``); adapters come from ``lightning_peft.AdapterCallback`` in ``trainer.callbacks``.
After ``fit``, when the datamodule has a test split and the model a ``test_step``, the CLI runs
``trainer.test`` (on the best checkpoint when a ``ModelCheckpoint`` saved one) and prints every
``test_*`` metric, the main one (``test_acc`` when logged) last, e.g. ``test_acc: 0.9641``.

A bad value in the config or on the command line (a type jsonargparse refuses, or a value a
class's ``__init__`` refuses) prints one short message naming the config key and the fix, e.g.
``error: trainer.callbacks[1].init_args.adapter.init_args.alpha: alpha must be a finite number
> 0, got -3.0``, to stderr and exits with status 2; ``LIGHTNING_PEFT_DEBUG=1`` raises the
original exception (full traceback) instead.
"""

from __future__ import annotations

import os

# Nothing may download at run time; set before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys  # noqa: E402
from typing import Any  # noqa: E402

from jsonargparse import ArgumentError  # noqa: E402
from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402
from lightning.pytorch.utilities.model_helpers import is_overridden  # noqa: E402

from lightning_peft.cli_errors import (  # noqa: E402
    ConfigError,
    debug_requested,
    instantiation_error,
    parse_error,
)


class LightningPEFTCLI(LightningCLI):
    """``LightningCLI`` with ``--test_after_fit`` (default true).

    ``test_results`` holds what ``trainer.test`` returned after ``fit`` (a list with one dict
    of metrics per test dataloader), or ``None`` when no test ran.
    """

    test_results: list[dict[str, float]] | None = None

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # raise ArgumentError instead of printing the usage and exiting: parse_arguments turns
        # it into one short ConfigError (the main and every subcommand parser come through here)
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            if debug_requested():
                raise
            argv = [str(a) for a in (sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else [])]
            raise parse_error(str(err), argv) from err

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            if debug_requested():
                raise
            subcommand = self.config.get("subcommand")
            config = self.config.get(subcommand) if subcommand else self.config
            short = instantiation_error(err, config)
            if short is None:
                raise
            raise short from err

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, evaluate on the datamodule's test split (best checkpoint if one was saved) and print the test metrics.",
        )

    def after_fit(self) -> None:
        if not self._get(self.config, "test_after_fit", True):
            return
        trainer, model, datamodule = self.trainer, self.model, self.datamodule
        if trainer.interrupted or trainer.sanity_checking:
            return
        if datamodule is None or not is_overridden("test_dataloader", datamodule, LightningDataModule):
            rank_zero_info("No test split in the datamodule: skipping the test run after fit.")
            return
        if not is_overridden("test_step", model, LightningModule):
            rank_zero_info(f"{type(model).__name__} has no test_step: skipping the test run after fit.")
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")  # "" without a ModelCheckpoint
        ckpt_path = "best" if best else None
        rank_zero_info(f"Testing {'the best checkpoint ' + best if best else 'the final weights'}.")
        self.test_results = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        if trainer.is_global_zero:
            print(format_test_results(self.test_results), flush=True)


def format_test_results(results: list[dict[str, float]]) -> str:
    """One ``name: value`` line per test metric, the main metric (``test_acc``) last."""
    metrics: dict[str, float] = {}
    for result in results:
        metrics.update({k: float(v) for k, v in result.items()})
    main_key = "test_acc" if "test_acc" in metrics else None
    lines = [f"{k}: {v:.4f}" for k, v in sorted(metrics.items()) if k != main_key]
    if main_key is not None:
        lines.append(f"{main_key}: {metrics[main_key]:.4f}")
    return "\n".join(lines)


def cli_main(args: Any = None, run: bool = True) -> LightningPEFTCLI:
    """Build (and by default run) the CLI; ``args`` as for ``LightningCLI`` (a list of strings,
    or ``None`` for ``sys.argv``). Returns the CLI, whose ``trainer``, ``model``, ``datamodule``
    and ``test_results`` tests can inspect.

    A refused configuration prints one ``ConfigError`` message to stderr and raises
    ``SystemExit(2)``; with ``LIGHTNING_PEFT_DEBUG=1`` the original exception propagates."""
    try:
        cli = LightningPEFTCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # The modules build their own AdamW over trainable parameters only.
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )
    except ConfigError as err:
        print(err.render(), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if run:
        close_process_group()
    return cli


def close_process_group() -> None:
    """After a multi-process run: wait for every rank, then destroy the default process group.

    Lightning leaves the group to an ``atexit`` hook that destroys it rank by rank; a gloo group
    torn down while a peer is still exiting can abort the process ("terminate called without an
    active exception", status -6) after the run's results were written, which a pipeline reads
    as a failed run. A no-op in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


#: hand-off commands, dispatched before LightningCLI (which owns fit/validate/test/predict)
HANDOFF_COMMANDS = ("merge", "inspect")


def main(args: Any = None) -> None:
    """Console-script entry point (``lightning-peft``). Returns nothing so that the script's
    ``sys.exit(main())`` exits with status 0. ``merge`` and ``inspect`` go to
    :mod:`lightning_peft.cli_merge` / :mod:`lightning_peft.cli_inspect`, the rest to LightningCLI."""
    argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
    if argv and argv[0] in HANDOFF_COMMANDS:
        if argv[0] == "merge":
            from lightning_peft.cli_merge import main as merge_main

            merge_main(argv[1:])
        else:
            from lightning_peft.cli_inspect import main as inspect_main

            inspect_main(argv[1:])
        return
    cli_main(args)


if __name__ == "__main__":
    main()
