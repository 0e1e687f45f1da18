"""`python -m diva_lightning fit --config experiments/full.yaml` (see diva_lightning.cli)."""

from diva_lightning.cli import main

if __name__ == "__main__":
    main()
