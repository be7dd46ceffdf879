"""Three-region radiomics (tumour, peritumoral ring, whole lung) with pyradiomics.

Public API
----------
:func:`extract_regions`
    All regions of one CT, each with its versioned profile, in parallel processes
    (values bit-identical to a serial run) → :class:`RadiomicsResult`.
:func:`extract_region`
    One region in this process → :class:`RegionFeatures`.
:func:`load_profile`, :func:`profile_names`, :func:`profile_from_settings`
    The shipped profiles (``params/*.yaml``: ``tumour-v1``, ``ring-v1``, ``lung-v1``,
    ``published-full-v1``) or explicit pyradiomics settings.
:func:`mesh_diameters`, :func:`mesh_area_volume`, :class:`FastRadiomicsShape`
    pyradiomics' shape coefficients without its quadratic diameter search, identical
    values (:mod:`radnode.models.radiomics.fast_shape`).

See ``docs/ibsi.md`` for the settings, their IBSI alignment and what each profile costs.
"""

from radnode.models.radiomics.extract import (
    DEFAULT_PROFILES,
    ENGINE_NAME,
    ENGINE_VERSION,
    Profile,
    RadiomicsResult,
    RadnodeFeatureExtractor,
    RegionFeatures,
    engine_info,
    extract_region,
    extract_regions,
    load_profile,
    profile_from_settings,
    profile_names,
)
from radnode.models.radiomics.fast_shape import (
    FastRadiomicsShape,
    MeshDiameters,
    mesh_area_volume,
    mesh_diameters,
)

__all__ = [
    "DEFAULT_PROFILES",
    "ENGINE_NAME",
    "ENGINE_VERSION",
    "FastRadiomicsShape",
    "MeshDiameters",
    "Profile",
    "RadiomicsResult",
    "RadnodeFeatureExtractor",
    "RegionFeatures",
    "engine_info",
    "extract_region",
    "extract_regions",
    "load_profile",
    "mesh_area_volume",
    "mesh_diameters",
    "profile_from_settings",
    "profile_names",
]
