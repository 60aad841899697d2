"""A click group whose subcommands are imported only when invoked, so that `--help` stays fast and a command
never pays for another's heavy imports (ffcv, tensorboard, pycocoevalcap)."""

import importlib

import click


class LazyGroup(click.Group):
    """Subcommands from a table {name: (module whose `command` it is, one-line help)}."""

    def __init__(self, *args, table: dict[str, tuple[str, str]], section: str = "Commands", **kwargs):
        super().__init__(*args, **kwargs)
        self.table, self.section = table, section

    def list_commands(self, ctx):
        return list(self.table)

    def get_command(self, ctx, name):
        if name not in self.table:
            return None
        return importlib.import_module(self.table[name][0]).command

    def format_commands(self, ctx, formatter):
        with formatter.section(self.section):
            formatter.write_dl([(name, help_text) for name, (_, help_text) in self.table.items()])
