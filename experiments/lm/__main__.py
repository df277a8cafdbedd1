"""`python -m experiments.lm`: the language-model study (see `study.py`)."""

from experiments.lm.study import main

if __name__ == "__main__":
  main()
