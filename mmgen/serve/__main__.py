"""`python -m mmgen.serve [--model DIR] [--host H] [--port P] ...`: the same as `mmgen serve`."""

from mmgen.cli import Parser
from mmgen.outputs import exit_on_error
from mmgen.serve.cli import add_arguments, cmd_serve


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="python -m mmgen.serve", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    exit_on_error(lambda: cmd_serve(args), False)


if __name__ == "__main__":
    main()
