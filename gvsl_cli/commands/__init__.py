"""Subcommands of ``gvsl``; each module has ``register(app)`` and imports torch lazily.

To add a command: write ``gvsl_cli/commands/<name>.py`` with a ``register(app)`` function
and append the module to ``COMMAND_MODULES`` (order = order in ``gvsl --help``).
"""

from gvsl_cli.commands import apply, demo, embed, fetch_weights, finetune, info, pretrain, register, segment

COMMAND_MODULES = [pretrain, register, apply, embed, finetune, segment, fetch_weights, demo, info]
