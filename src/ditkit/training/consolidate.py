"""python -m ditkit.training.consolidate RUN/checkpoints/last.ckpt [--output FILE]

Merge a sharded (FSDP2) checkpoint folder into one .ckpt file (default: <folder>.consolidated) that
loads on a single process: evaluate.py, Trainer.fit(ckpt_path=) without FSDP, or torch.load."""

import argparse

from .parallel import consolidate_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    parser.add_argument(
        "folder", help="a sharded checkpoint folder, e.g. outputs/RUN/checkpoints/last.ckpt"
    )
    parser.add_argument(
        "--output", default=None, help="the file to write (default: <folder>.consolidated)"
    )
    args = parser.parse_args()
    print(consolidate_checkpoint(args.folder, args.output))


if __name__ == "__main__":
    main()
