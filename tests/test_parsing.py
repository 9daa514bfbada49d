import pytest

from refine_af_pipeline.instructions.parsing import parse_instance, parse_numbered_continuation

pytestmark = pytest.mark.unit


def test_numbered_continuation_splits_items():
    response = " Suggest a name for a cafe.\n10. Explain tides to a child.\n11.  Convert  3 km to miles.\n"
    parsed = parse_numbered_continuation(response, 9, hit_token_limit=False)
    assert parsed.status == "ok"
    assert parsed.instructions == ["Suggest a name for a cafe.", "Explain tides to a child.", "Convert 3 km to miles."]


def test_truncated_last_item_is_dropped_at_token_limit():
    parsed = parse_numbered_continuation(" First task here.\n10. Second task that got cu", 9, hit_token_limit=True)
    assert parsed.instructions == ["First task here."]
    assert parsed.dropped_truncated


def test_numbers_must_run_on_and_commentary_is_cut():
    response = " List 3 fruits.\n\nThese are examples.\n10. Name 2 rivers in Europe.\n2. not an item"
    parsed = parse_numbered_continuation(response, 9, hit_token_limit=False)
    assert parsed.instructions == ["List 3 fruits.", "Name 2 rivers in Europe."]


def test_an_item_is_its_first_line_and_a_nested_list_under_it_is_not_an_item():
    # The model starts answering the instruction with a list of its own, until the token limit.
    response = (
        " Create a packing list for a weekend by the sea:\n1. Sunscreen\n2. Towel\n3. A book\n4. Something that got cu"
    )
    parsed = parse_numbered_continuation(response, 9, hit_token_limit=True)
    assert parsed.instructions == ["Create a packing list for a weekend by the sea:"]
    assert not parsed.dropped_truncated  # the instruction's own line was complete


def test_a_restarted_numbering_is_read_as_a_list_of_its_own():
    response = " 1. Name the largest planet.\n2. Explain why ice floats on water.\n3. Suggest a title for a"
    parsed = parse_numbered_continuation(response, 9, hit_token_limit=True)
    assert parsed.instructions == ["Name the largest planet.", "Explain why ice floats on water."]
    assert parsed.dropped_truncated
    # Not a restart: a number inside the first instruction, or a fragment of list markers.
    assert parse_numbered_continuation(" 10 ways to save water.", 9, False).instructions == ["10 ways to save water."]
    assert parse_numbered_continuation(" 1. 1. 2. 2. 3.", 9, False).instructions == ["1. 2. 2. 3."]


def test_empty_and_unparseable_responses_are_reported():
    assert parse_numbered_continuation("   ", 9, False).status == "empty"
    only_cut = parse_numbered_continuation(" half an instruc", 9, hit_token_limit=True)
    assert only_cut.status == "unparseable" and only_cut.instructions == []


def test_parse_instance_reads_input_and_output():
    parsed = parse_instance("Input: The cat sat.\nOutput: Le chat etait assis.")
    assert (parsed.input, parsed.output, parsed.status) == ("The cat sat.", "Le chat etait assis.", "ok")


def test_parse_instance_noinput_and_second_example():
    parsed = parse_instance("Input: <noinput>\nOutput: Blue\nInput: another\nOutput: x")
    assert (parsed.input, parsed.output) == ("", "Blue")


def test_parse_instance_failures():
    assert parse_instance("just some text").status == "missing_output"
    assert parse_instance("Input: a b c\nOutput:   ").status == "empty_output"
