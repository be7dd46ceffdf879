"""Tiny external models built on the fly: an nnU-Net v2 trained-model folder and a MONAI bundle.

Both are *thresholding* networks whose weights are set by hand, so their output is known
exactly: every voxel brighter than :data:`BLOB_HU` is label :data:`TUMOUR_LABEL`. A
phantom with a planted blob brighter than that (and nothing else as bright) therefore
must come back with the blob where it was; anything else is a geometry bug in radnode's
adapter (axis order, flips, spacing, resampling back to the CT grid).

The networks are built through the packages' own classes (nnU-Net's trainer builds its
``PlainConvUNet`` from ``plans.json``; the MONAI bundle's ``network_def`` is instantiated by
``monai.bundle.ConfigParser``), so the folders are what those packages write and read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from radnode.phantom import generate_phantom
from radnode.phantom.dicom_series import write_ct_series

#: HU of the planted blob and the networks' threshold (nothing in the phantom is this bright).
BLOB_HU = 2500
THRESHOLD_HU = 2000
#: The label value both tiny models give the blob; LUNG_LABEL is never produced.
TUMOUR_LABEL = 1
LUNG_LABEL = 2

NNUNET_DATASET = "Dataset990_RadnodeTiny"
NNUNET_CONFIGURATION = "3d_fullres"


def blob_phantom(out: Path, seed: int = 11, slices: int = 40, matrix: int = 128) -> tuple[Path, np.ndarray]:
    """A synthetic chest whose tumour voxels are set to :data:`BLOB_HU`; returns (CT folder, blob mask zyx)."""
    result = generate_phantom(out, seed=seed, slices=slices, tumors=1, matrix=matrix, tumor_types=["solid"])
    volume = result.volume
    blob = volume.tumors > 0
    assert blob.any() and int(volume.hu[~blob].max()) < THRESHOLD_HU, "the phantom must have one bright blob only"
    hu = volume.hu.copy()
    hu[blob] = BLOB_HU
    write_ct_series(hu, volume.geometry, result.header, result.ct_dir)
    return result.ct_dir, blob


# --- nnU-Net v2 -------------------------------------------------------------------------------


def nnunet_plans(spacing_zyx: tuple[float, float, float] = (2.5, 3.0, 3.0)) -> dict[str, Any]:
    """A ``plans.json`` for a two-stage PlainConvUNet of 1x1x1 convolutions without normalisation layers."""
    resampling = {"order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": NNUNET_DATASET,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing_zyx),
        "original_median_shape_after_transp": [40, 100, 100],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            NNUNET_CONFIGURATION: {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [32, 64, 64],
                "median_image_size_in_voxels": [40, 100, 100],
                "spacing": list(spacing_zyx),
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **resampling},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, **resampling},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, **resampling},
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {
                        "n_stages": 2,
                        "features_per_stage": [4, 8],
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[1, 1, 1], [1, 1, 1]],
                        "strides": [[1, 1, 1], [2, 2, 2]],
                        "n_conv_per_stage": [1, 1],
                        "n_conv_per_stage_decoder": [1],
                        "conv_bias": True,
                        "norm_op": None,
                        "norm_op_kwargs": None,
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        # CTNormalization: clip to the percentiles, then (HU - mean) / std, i.e. HU / 1000 here.
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 3071.0, "mean": 0.0, "median": 0.0, "min": -1024.0,
                  "percentile_00_5": -1024.0, "percentile_99_5": 3071.0, "std": 1000.0}
        },
    }


def nnunet_dataset_json() -> dict[str, Any]:
    return {
        "name": "RadnodeTiny",
        "release": "0.3-test",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "blob": TUMOUR_LABEL, "lung": LUNG_LABEL},
        "numTraining": 0,
        "file_ending": ".nii.gz",
    }


def nnunet_threshold_network(plans: dict[str, Any], dataset: dict[str, Any]) -> torch.nn.Module:
    """nnU-Net's own network for ``plans``, with weights that make label 1 = (HU > THRESHOLD_HU)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    config = manager.get_configuration(NNUNET_CONFIGURATION)
    heads = manager.get_label_manager(dataset).num_segmentation_heads
    net = nnUNetTrainer.build_network_architecture(manager, config, 1, heads, enable_deep_supervision=False)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        state = net.state_dict()
        # Encoder stage 0, feature 0: the normalised intensity itself.
        state["encoder.stages.0.0.convs.0.conv.weight"][0, 0, 0, 0, 0] = 1.0
        # Decoder: input = cat(upsampled deep features (4), skip features (4)); pass skip feature 0 on.
        state["decoder.stages.0.convs.0.conv.weight"][0, 4, 0, 0, 0] = 1.0
        # Segmentation head: logit(label 1) = 20 * (x - threshold), all other logits 0.
        state["decoder.seg_layers.0.weight"][TUMOUR_LABEL, 0, 0, 0, 0] = 20.0
        state["decoder.seg_layers.0.bias"][TUMOUR_LABEL] = -20.0 * THRESHOLD_HU / 1000.0
        state["decoder.seg_layers.0.bias"][LUNG_LABEL] = -1000.0
        net.load_state_dict(state)
    return net


def build_nnunet_folder(root: Path, folds: tuple[int, ...] = (0, 1)) -> Path:
    """Write ``root/<Dataset>/nnUNetTrainer__nnUNetPlans__3d_fullres`` with ``folds``; return that folder."""
    folder = root / NNUNET_DATASET / f"nnUNetTrainer__nnUNetPlans__{NNUNET_CONFIGURATION}"
    folder.mkdir(parents=True)
    plans, dataset = nnunet_plans(), nnunet_dataset_json()
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    net = nnunet_threshold_network(plans, dataset)
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        checkpoint = {
            "network_weights": net.state_dict(),
            "trainer_name": "nnUNetTrainer",
            "init_args": {"plans": plans, "configuration": NNUNET_CONFIGURATION, "fold": fold,
                          "dataset_json": dataset},
            "inference_allowed_mirroring_axes": (0, 1, 2),
            "current_epoch": 1,
        }
        torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


# --- MONAI bundle -----------------------------------------------------------------------------


def monai_inference_config(invert: bool = True) -> dict[str, Any]:
    """``configs/inference.json``: RAS + 3.5 mm resampling, a 1x1x1 conv, argmax, optional Invertd."""
    post: list[dict[str, Any]] = [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]
    if invert:
        post.append({"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                     "nearest_interp": True, "to_tensor": True})
    return {
        "imports": ["$import glob"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "dataset_dir": "/does/not/exist",
        "output_dir": "$@bundle_root + '/eval'",
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 3, "kernel_size": 1},
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "image_only": False},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": [3.5, 3.5, 3.0], "mode": "bilinear"},
                {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1000, "a_max": 3000,
                 "b_min": -1.0, "b_max": 3.0, "clip": True},
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 32], "sw_batch_size": 1, "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": post},
    }


def monai_threshold_network(lung_below_hu: float | None = None) -> torch.nn.Conv3d:
    """A 1x1x1 conv: logit(label 1) = 20 * (x - threshold) with x = HU / 1000 after ScaleIntensityRanged;
    with ``lung_below_hu``, label 2 is every voxel darker than that (air and lungs)."""
    net = torch.nn.Conv3d(1, 3, kernel_size=1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.weight[TUMOUR_LABEL, 0] = 20.0
        net.bias[TUMOUR_LABEL] = -20.0 * THRESHOLD_HU / 1000.0
        net.bias[LUNG_LABEL] = -1000.0
        if lung_below_hu is not None:
            net.weight[LUNG_LABEL, 0] = -20.0
            net.bias[LUNG_LABEL] = 20.0 * lung_below_hu / 1000.0
    return net


def build_monai_bundle(
    root: Path, torchscript: bool = False, invert: bool = True, lung_below_hu: float | None = None
) -> Path:
    """Write a MONAI bundle folder (configs/, models/) at ``root``; return it."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(monai_inference_config(invert), indent=2))
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.2.0-test",
        "name": "radnode tiny threshold",
        "monai_version": "1.4.0",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": 1}},
            "outputs": {"pred": {"type": "image", "num_channels": 3,
                                 "channel_def": {"0": "background", "1": "blob", "2": "lung"}}},
        },
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    net = monai_threshold_network(lung_below_hu)
    if torchscript:
        torch.jit.script(net).save(str(root / "models" / "model.ts"))
    else:
        torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def read_mask(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0
