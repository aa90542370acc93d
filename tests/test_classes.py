import pytest

from bloodcell_lib.classes import CLASSES, FILE_PREFIXES, canonical_class


def test_class_order_is_fixed():
    assert CLASSES == ("basophil", "erythroblast", "monocyte", "myeloblast", "seg_neutrophil")
    assert set(FILE_PREFIXES) == set(CLASSES)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("seg_neutrophil", "seg_neutrophil"),
        ("segmented neutrophil", "seg_neutrophil"),
        ("Segmented_Neutrophil", "seg_neutrophil"),
        ("neutrophil", "seg_neutrophil"),
        ("NEUTROPHILS", "seg_neutrophil"),
        ("Basophil", "basophil"),
        ("erythroblasts", "erythroblast"),
        ("Myeloblast", "myeloblast"),
        ("mono-cyte", "monocyte"),
        ("lymphocyte", None),
        ("masks", None),
        ("", None),
    ],
)
def test_folder_names_are_matched_case_insensitively(name, expected):
    assert canonical_class(name) == expected
