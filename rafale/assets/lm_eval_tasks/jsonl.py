"""The bundled tasks' data loader: their `custom_dataset`, so that the JSON Lines files next to this
module are found from any working directory (a plain `dataset_path: json` resolves relative
`data_files` against the working directory) and load in memory, with no datasets cache written."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_files: dict[str, str], **metadata) -> datasets.DatasetDict:
    """{split: file name next to this module} -> a DatasetDict of those splits. lm-eval passes the task's
    metadata (version, config source, ...) as keyword arguments as well; they are not needed here."""
    splits = {}
    for split, name in data_files.items():
        with open(HERE / name, encoding="utf-8") as f:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f])
    return datasets.DatasetDict(splits)
