"""The `splitserve` subcommands, one module each: `add_parser(sub)` adds a
subcommand's parser and sets `run`, the function that carries it out."""
