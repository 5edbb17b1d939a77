"""``python -m medreg`` (also what ``torchrun -m medreg`` runs)."""

from medreg.cli import main

if __name__ == "__main__":
    main()
