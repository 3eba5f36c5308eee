"""Train, validate, test or predict with mmgpt through LightningCLI.

    python scripts/train.py fit --config configs/shapes.yaml
    python scripts/train.py fit --config configs/tiny.yaml --trainer.fast_dev_run=true
    python scripts/train.py fit --config configs/shapes.yaml --print_config
    python scripts/train.py fit --config configs/shapes.yaml --ckpt_path runs/shapes/csv/version_0/checkpoints/last.ckpt

--ckpt_path resumes (fit) or evaluates (validate, test, predict) a local checkpoint file, always read with
weights_only=True; a URL is refused. Training stops with an error at the first NaN or inf loss or gradient.
"""

from mmgpt.train.cli import main

if __name__ == "__main__":
    main()
