"""Training RA-Seg on user data: case discovery, augmentation, the training loop.

``radnode train seg`` (:mod:`radnode.cli.train_cmd`) is the front end; the modules here
know no CLI and no queue:

* :mod:`~radnode.models.training.data`: find cases (MSD / nnU-Net NIfTI, or DICOM CT +
  RTSTRUCT), load them onto the network's grid, split them into folds;
* :mod:`~radnode.models.training.transforms`: the method's augmentations and patch
  sampling as MONAI dictionary transforms, and the a2t box channel;
* :mod:`~radnode.models.training.loop`: Dice + cross-entropy, Adam, checkpoints and resume,
  validation Dice, and the bundle at the end.
"""
