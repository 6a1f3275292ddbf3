"""The ``dlfix`` console command: ``dlfix <command> [flags]``.

Commands (each a module of this package holding its flags and ``main``; the
``experiments/*.py`` scripts are thin wrappers around the same modules):

* ``train``: train a base model into a workdir
  (``training.train.train_and_evaluate``);
* ``fix``: fix a base model, ``--base`` = a workdir or a Keras .h5
  (``study.fix.run``);
* ``evaluate``: original vs fixed models on a test split
  (``study.compare.evaluate_paths``);
* ``study``: run or resume a study (``study.runner.run_study``);
* ``report``: tables, Scott-Knott groups and figures of a study
  (``report.write_report``);
* ``export``: write a model (e.g. a fixed one) as a Keras .h5
  (``models.keras_h5.export_h5``).

``dlfix <command> --help`` lists a command's flags. Only the chosen
command's module is imported, so commands never see each other's flags.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags

COMMANDS = {
    "train": "train a base model: --config=FILE --workdir=DIR",
    "fix": "fix a base model: --approach=NAME --workdir=DIR "
           "(--base=WORKDIR|FILE.h5 --dataset=NAME, or --config=FILE)",
    "evaluate": "evaluate models: --dataset=NAME --original=MODEL "
                "--fixed=MODEL ...",
    "study": "run or resume a study: --config=FILE --workdir=DIR",
    "report": "write a study's report: --workdir=DIR",
    "export": "write a model as Keras .h5: --model=MODEL --h5=FILE.h5",
}


def _usage(prog: str) -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"usage: {prog} <command> [flags]   ({prog} <command> --help "
             f"lists its flags)", "", "commands:"]
    lines += [f"  {c:<{width}}  {h}" for c, h in COMMANDS.items()]
    return "\n".join(lines)


def _config_import_root(argv: list[str]) -> str | None:
    """The directory from which a ``--config=FILE``'s own package imports
    resolve: above the outermost package (``__init__.py``) holding FILE.

    ``experiments/configs/*.py`` import ``experiments.configs.common``;
    ``python -m`` finds it because it runs from the repository root, the
    console script (whose ``sys.path[0]`` is its own directory) through
    this, from any directory.
    """
    path = None
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    if not path:
        return None
    d = os.path.dirname(os.path.abspath(path.split(":", 1)[0]))
    if not os.path.isfile(os.path.join(d, "__init__.py")):
        return None
    while os.path.isfile(os.path.join(os.path.dirname(d), "__init__.py")):
        d = os.path.dirname(d)
    return os.path.dirname(d)


# Errors a user can cause (bad flags, configs, paths, data, a locked or
# read-only workdir, a full disk): one line and exit status 2 instead of a
# traceback. Anything else is a bug and keeps its traceback; so do these
# with DLFIX_TRACEBACK=1 in the environment.
EXIT_USER_ERROR = 2


def _user_errors() -> tuple[type, ...]:
    # after flag parsing, to keep `dlfix` and --help fast
    from dlfix_jax.data.base import DataError
    from dlfix_jax.report.tables import ReportError
    from dlfix_jax.training.checkpoint import CheckpointError
    return (ValueError, KeyError, OSError, RuntimeError, DataError,
            ReportError, CheckpointError)


def one_line(e: BaseException) -> str:
    """``e`` as one line: its type when the message does not say it."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    text = " ".join(str(msg).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text += f": {e.filename}"
    return text


def _guarded(main, prog: str):
    def run(argv):
        try:
            return main(argv)
        except _user_errors() as e:
            if os.environ.get("DLFIX_TRACEBACK"):
                raise
            print(f"{prog}: error: {one_line(e)} (DLFIX_TRACEBACK=1 shows "
                  "the traceback)", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
    return run


def run_command(module, argv: list[str]) -> None:
    """Runs ``module.main`` under ``absl.app.run`` with ``argv`` (program
    name first), making ``--help`` list the module's flags."""
    root = _config_import_root(argv)
    if root and root not in sys.path:
        sys.path.append(root)
    sys.argv = list(argv)
    main_mod = sys.modules.get("__main__")
    if main_mod is not None and module.__doc__:
        main_mod.__doc__ = module.__doc__
    fv = flags.FLAGS
    for fl in fv.get_key_flags_for_module(module.__name__):
        fv.register_key_flag_for_module(argv[0], fl)
    app.run(_guarded(module.main, os.path.basename(argv[0])),
            argv=list(argv))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dlfix`` console script."""
    argv = list(sys.argv if argv is None else argv)
    prog = "dlfix"
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage(prog))
        sys.exit(0 if len(argv) >= 2 else 2)
    cmd = argv[1]
    if cmd not in COMMANDS:
        print(f"{prog}: unknown command {cmd!r}\n\n{_usage(prog)}",
              file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(f"dlfix_jax.cli.{cmd}")
    run_command(module, [f"{prog} {cmd}"] + argv[2:])


if __name__ == "__main__":
    main()
