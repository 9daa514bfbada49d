import pytest

from refine_af_pipeline.instructions.filters import rejection_reason

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "instruction, reason",
    [
        ("Name three rivers", "too_short"),
        (" ".join(["word"] * 151), "too_long"),
        ("Describe the image below in detail", "blacklisted:image"),
        ("Explain how to go to the station", "blacklisted:go to"),
        ("Summarise the attached FILES for me", "blacklisted:files"),
        ("Write a program that sorts numbers", "starts_with_write_a_program"),
        ("- List four ways to save water", "starts_with_punctuation"),
        ("Ébauchez un plan pour la semaine", "starts_with_non_ascii"),
        ("1. 1. 2. 2. 3. 3. 4. 4.", "starts_with_list_number"),
        ("2. Use an analogy: the sentence reflects the writer's mood", "starts_with_list_number"),
        ("3) Rewrite this message so it sounds polite", "starts_with_list_number"),
        ("5 tips for a calm morning routine", None),  # a number as a word, no list marker
        ("3.5 litres is how many cups? Convert it", None),  # a decimal, not a list marker
        ("Suggest four names for a bakery", None),
        ("Explain what a mapping function does", None),  # "map" only as a whole word
    ],
)
def test_each_filter_reason(instruction, reason):
    assert rejection_reason(instruction) == reason
