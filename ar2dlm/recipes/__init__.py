"""Jobs as recipes: one module per command, built from the library packages (model, data, masking, engine,
training, distillation, evaluation).

Every recipe module has the same four parts, which is all the command line (`ar2dlm/cli.py`) knows about it:
  * a config dataclass: every setting of the job, its default and its help text, checked in `__post_init__` so a
    bad value fails before any model loads;
  * `add_arguments(parser)`: the command's options, derived from the config (`utils.cli_config.add_dataclass_args`)
    and, for a command that decodes, from `DecodeParams` (`engine.params.add_decode_args`);
  * `config_from_args(args)`: the config of parsed options;
  * `run(cfg)`: the job; it prints what the command prints and returns its result (an int is the exit status).

The library never imports a recipe and recipes never import each other: what two jobs share lives in the library.
The CLI imports a recipe only when its command runs, so `ar2dlm -h` and one command's start-up stay light.
"""
