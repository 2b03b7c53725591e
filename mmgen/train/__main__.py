"""`python -m mmgen.train …` and `accelerate launch -m mmgen.train …`: see `mmgen.train.entrypoint`."""

from mmgen.train.entrypoint import main

if __name__ == "__main__":
    main()
