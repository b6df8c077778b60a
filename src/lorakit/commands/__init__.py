"""One module per `lorakit` subcommand; see lorakit.cli for the protocol they follow."""
