"""`optimum-cli gblm prune|eval`: optimum-gblm's commands under optimum's CLI.

optimum imports every module in the `optimum.commands.register` namespace when `optimum-cli` starts and reads its
REGISTER_COMMANDS, so this file stays light: the heavy imports happen in `run()`.
"""

import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class _GBLMSubcommand(BaseOptimumCLICommand):
    name = ""

    def run(self):
        from optimum_gblm.cli import run_command

        sys.exit(run_command(self.name, self.args))


class GBLMPruneCommand(_GBLMSubcommand):
    name = "prune"

    @staticmethod
    def parse_args(parser):
        from optimum_gblm.cli import add_prune_arguments

        add_prune_arguments(parser)


class GBLMEvalCommand(_GBLMSubcommand):
    name = "eval"

    @staticmethod
    def parse_args(parser):
        from optimum_gblm.cli import add_eval_arguments

        add_eval_arguments(parser)


class GBLMPushCommand(_GBLMSubcommand):
    name = "push"

    @staticmethod
    def parse_args(parser):
        from optimum_gblm.cli import add_push_arguments

        add_push_arguments(parser)


class GBLMCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="gblm", help="Prune causal LMs with GBLM-Pruner, Wanda or magnitude (optimum-gblm).")
    SUBCOMMANDS = (
        CommandInfo(name="prune", help="prune a model and save it as a checkpoint", subcommand_class=GBLMPruneCommand),
        CommandInfo(name="eval", help="perplexity of a model on a text", subcommand_class=GBLMEvalCommand),
        CommandInfo(name="push", help="upload a pruned checkpoint with its model card", subcommand_class=GBLMPushCommand),
    )


REGISTER_COMMANDS = [GBLMCommand]
