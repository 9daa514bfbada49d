import pytest

from refine_af_pipeline.filters import rejection_reason


@pytest.mark.parametrize("instruction, reason", [
    ("Name three rivers", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    ("Describe the image below in detail", "blacklisted:image"),
    ("Explain how to go to the station", "blacklisted:go to"),
    ("Summarise the attached FILES for me", "blacklisted:files"),
    ("Write a program that sorts numbers", "starts_with_write_a_program"),
    ("- List four ways to save water", "starts_with_punctuation"),
    ("Ébauchez un plan pour la semaine", "starts_with_non_ascii"),
    ("Suggest four names for a bakery", None),
    ("Explain what a mapping function does", None),  # "map" only as a whole word
])
def test_each_filter_reason(instruction, reason):
    assert rejection_reason(instruction) == reason
