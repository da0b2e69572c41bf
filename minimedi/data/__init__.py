"""Datasets as dicts {"image": [C, H, W] in [-1, 1], "caption", attributes...}: the embedded phantom
brain-MR corpus (the default data) with its fixed prompt sets, and loaders for real data."""
from minimedi.data.captions import evaluation_prompts, tuning_prompts
from minimedi.data.phantom import PhantomCorpus, pretraining_corpus, target_corpus
from minimedi.data.brats import BraTSSlices
from minimedi.data.images import DataWarning, LoadReport
from minimedi.data.load import (Corpus, describe, load_pretraining_corpus, load_pretraining_data, load_target_corpus,
                                load_target_data, materialize)
from minimedi.data.roco import ROCO, ROCOv2
