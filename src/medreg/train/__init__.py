"""Learning-based registration: data, synthetic pairs, the training loop, checkpoints,
distributed training and inference.

``medreg train CONFIG.yaml`` runs :func:`train` on a :class:`TrainConfig`; ``medreg predict``
runs a checkpoint or a bundled model (:func:`load_checkpoint`, :mod:`medreg.train.predict`).
Conventions (voxel-unit displacements on the network grid, fixed → moving) are in
:mod:`medreg.train.batch` and :mod:`medreg.train.preprocess`.
"""

from medreg.train.augment import Augment, AugmentConfig
from medreg.train.batch import Pair, PairBatch, collate_pairs
from medreg.train.checkpoint import LoadedModel, bundled_models, load_checkpoint, save_checkpoint
from medreg.train.config import TrainConfig, config_from_dict, load_train_config
from medreg.train.data import (PairDataset, Record, SyntheticPairDataset, all_pairs, atlas_pairs,
                               listed_pairs, pairs_from_l2r_json, records_from_csv,
                               records_from_folder, records_from_l2r_json, split_by_subject)
from medreg.train.loop import TrainResult, build_datasets, train
from medreg.train.losses import TrainingLoss, build_loss
from medreg.train.preprocess import (PrepInfo, PreprocessConfig, field_to_world, network_grid,
                                     prediction_transform, prepare_image)
from medreg.train.synth import SynthConfig, deformed_pair, random_label_map, render_labels, synth_label_pair

__all__ = [
    "Augment", "AugmentConfig", "LoadedModel", "Pair", "PairBatch", "PairDataset", "PrepInfo",
    "PreprocessConfig", "Record", "SynthConfig", "SyntheticPairDataset", "TrainConfig",
    "TrainResult", "TrainingLoss", "all_pairs", "atlas_pairs", "build_datasets", "build_loss",
    "bundled_models", "collate_pairs", "config_from_dict", "deformed_pair", "field_to_world",
    "listed_pairs", "load_checkpoint", "load_train_config", "network_grid", "pairs_from_l2r_json",
    "prediction_transform", "prepare_image", "random_label_map", "records_from_csv",
    "records_from_folder", "records_from_l2r_json", "render_labels", "save_checkpoint",
    "split_by_subject", "synth_label_pair", "train",
]
