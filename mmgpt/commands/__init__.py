"""The ``mmgpt`` command line: ``mmgpt.commands.main`` dispatches each subcommand to its module here."""
