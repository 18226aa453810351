"""One module per ``scopeside`` subcommand: ``add_args(parser)`` and ``main(args)``."""
