"""Train, validate, test or predict with mmgpt through LightningCLI.

    python scripts/train.py fit --config configs/shapes.yaml
    python scripts/train.py fit --config configs/tiny.yaml --trainer.fast_dev_run=true
    python scripts/train.py fit --config configs/shapes.yaml --print_config
"""

from mmgpt.train.cli import main

if __name__ == "__main__":
    main()
