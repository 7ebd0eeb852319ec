"""Command lines of the training CLIs, parsed by transformers' `HfArgumentParser`.

Every `transformers.TrainingArguments` field is a flag (`--per-device-train-batch-size`, `--bf16`,
`--gradient-accumulation-steps`, ...; underscores or dashes), beside the command's own options (a dataclass
per command). The run's training arguments merge in one order, later winning:

    the command's defaults  <  the run YAML's `training_args` (`--config`)  <  flags given on the command line

so only the TrainingArguments flags a user typed are taken from the command line: their parser defaults are
suppressed, and a flag left out never overrides the YAML.
"""

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from regionmed_clip.cli import positive_int

__all__ = ["TRAINING_ARGUMENT_NAMES", "TrainingCommandParser"]

TRAINING_ARGUMENT_NAMES = frozenset(field.name for field in dataclasses.fields(TrainingArguments) if field.init)
# TrainingArguments fields that must be positive whatever the command (argparse then names the flag).
_POSITIVE_FIELDS = ("max_steps", "save_steps", "logging_steps", "per_device_train_batch_size",
                    "gradient_accumulation_steps")


class TrainingCommandParser:
    """`HfArgumentParser` over `(options, TrainingArguments)` for one command.

    `options` is the command's own dataclass (its fields' metadata may hold `help` and `choices`);
    `types` maps an option or TrainingArguments field name to an argparse type function that checks its
    value (e.g. `positive_int`), since HfArgumentParser types a field by its annotation only;
    `shorthands` maps an extra flag to a TrainingArguments field (`{"--batch-size": "per_device_train_batch_size"}`).
    """

    def __init__(self, prog: str, description: str, options: type, types: Mapping[str, Callable[[str], Any]] = (),
                 shorthands: Mapping[str, str] = ()):
        self.options = options
        self.parser = HfArgumentParser((options, TrainingArguments), prog=prog, description=description,
                                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
        types = {**dict.fromkeys(_POSITIVE_FIELDS, positive_int), **dict(types)}
        option_names = {field.name for field in dataclasses.fields(options)}
        for action in self.parser._actions:
            if action.dest in types and action.type is not None:
                action.type = types[action.dest]
            if action.dest in TRAINING_ARGUMENT_NAMES and action.dest not in option_names:
                action.default = argparse.SUPPRESS  # a flag left out must not override the YAML
        for flag, field in dict(shorthands).items():
            self.parser.add_argument(flag, dest=field, type=types.get(field), default=argparse.SUPPRESS,
                                     help=f"shorthand for --{field.replace('_', '-')}")

    def parse(self, argv: Sequence[str] | None = None) -> tuple[Any, dict[str, Any]]:
        """`(options, training_flags)`: the command's options, and the TrainingArguments fields given on the
        command line (and only those) as `{field: value}`."""
        namespace = vars(self.parser.parse_args(argv))
        option_names = {field.name for field in dataclasses.fields(self.options)}
        options = self.options(**{name: namespace.pop(name) for name in option_names})
        return options, {name: value for name, value in namespace.items() if name in TRAINING_ARGUMENT_NAMES}
