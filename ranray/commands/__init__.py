"""One module per `ranray` verb: HELP, add_arguments(parser), run(args) -> int."""
