"""Personal data in call text: what is masked, what is left alone, and what the record says."""

from __future__ import annotations

import re

import pytest

from services.common import pii

VISA = "4111 1111 1111 1111"


@pytest.mark.parametrize("text, kind", [
    (f"my card number is {VISA} thanks", pii.CARD_NUMBER),
    ("my card number is 4,111,111,111,111,111, right", pii.CARD_NUMBER),  # how Whisper writes long numbers
    ("my IBAN is GB82 WEST 1234 5698 7654 32", pii.IBAN),
    ("mi IBAN es ES91 2100 0418 4502 0005 1332", pii.IBAN),
    ("call me back on +34 655 12 34 56 please", pii.PHONE_NUMBER),
    ("call me on 07700 900 123.", pii.PHONE_NUMBER),
    ("write to john.smith@example.com today", pii.EMAIL_ADDRESS),
    ("it is john dot smith at example dot com", pii.EMAIL_ADDRESS),
    ("mi correo es juan punto perez arroba correo punto es", pii.EMAIL_ADDRESS),
    ("my social security number is 123-45-6789.", pii.NATIONAL_ID),
    ("mi DNI es 12345678Z", pii.NATIONAL_ID),
    ("NIE X1234567L", pii.NATIONAL_ID),
    ("my national insurance number is AB 12 34 56 C", pii.NATIONAL_ID),
    ("and the CVV is 123.", pii.SECURITY_CODE),
    ("the security code on the back is 4 5 6", pii.SECURITY_CODE),
    ("el código de seguridad es el 789, gracias", pii.SECURITY_CODE),
    ("and the three digits on the back, 3 2 1 0", pii.SECURITY_CODE),
    ("the CVV is nine eight seven", pii.SECURITY_CODE),
    ("The security code is i87.", pii.SECURITY_CODE),  # how Whisper wrote "nine eight seven" once
    # How Whisper wrote card numbers read out in groups: separate runs, and thousands.
    ("My card number is 4111, 1111, 111, 113. Thank you", pii.CARD_NUMBER),
    ("yes, card number, 5,000, 555,000, 555,000, 555,000, 555,000, 444,000, 444,000,", pii.CARD_NUMBER),
    ("mi número de teléfono es el seis cinco cinco, uno dos tres, cuatro cinco seis", pii.PHONE_NUMBER),
    ("o meu número de telefone é nove um dois, três quatro cinco, seis sete oito", pii.PHONE_NUMBER),
    ("meine Telefonnummer ist null eins sieben zwo, drei vier fünf sechs", pii.PHONE_NUMBER),  # "zwo" for two
    # A card read out in groups with nothing to name it: its digits pass the Luhn check together.
    ("Yes. 4111, 1111, 1111, 1111. And it expires in December", pii.CARD_NUMBER),
    ("it's four one one one, one one one one, one one one one, one one one one", pii.CARD_NUMBER),
    ("é quatro um um um, um um um um, um um um um, um um um um", pii.CARD_NUMBER),
    ("ok, 5,555, 5,555, 5,555, 4,444, done", pii.CARD_NUMBER),  # the Mastercard test number, as thousands
    ("sure, 4111, 1111, 1111, 1112.", pii.CARD_NUMBER),  # four groups of four, one digit misheard
])
def test_personal_data_is_masked_with_its_kind(text: str, kind: str) -> None:
    masked, findings = pii.redact(text)
    assert [f.kind for f in findings] == [kind]
    assert masked[findings[0].start:findings[0].end] == f"[{kind}]"
    assert not re.search(r"\d\s?\d", masked) and "@" not in masked and "smith" not in masked


@pytest.mark.parametrize("text", [
    "I paid 1,250.00 dollars on 25.11.2026 for order 12345",
    "it costs $1,234,567 in total",
    "in 2024, 3 times a week at 10 30",
    "my DNI ends in 12345678A",  # wrong control letter: not a DNI, and the letter makes it no number
    "the IBAN GB82 WEST 1234 5698 7654 33 has a typo",  # fails mod 97 (its digits are still masked)
    "order 456 never arrived and I paid 125 dollars",  # three digits, but nothing names them a security code
    "the security code? I lost the card, so I paid 250 euros in cash at the shop",  # too far from its name
    "it is the card ending in 1234, the one I use",  # the last four digits, which an agent may keep
    "my phone number is the one on file, I called two or three times",
    "the security code is on the back, and 4G is down here",  # a word with one digit is no security code
    "I tried rooms 12, 14, 16, 18 and 20",  # a list of numbers is no card, and no phone number
    "we had outages in 2019, 2020, 2021, 2022",  # four groups of four figures, all of them years
    "they charged me 1,250, 3,400, 5,000, 2,100 over the year",  # amounts whose digits fail the Luhn check
])
def test_ordinary_numbers_are_left_alone(text: str) -> None:
    masked, findings = pii.redact(text)
    assert all(f.kind != pii.IBAN for f in findings)
    if "IBAN" not in text:
        assert (masked, findings) == (text, [])


def test_a_sixteen_digit_number_that_fails_luhn_is_still_masked_as_an_account_number() -> None:
    masked, findings = pii.redact("card 4111 1111 1111 1112 was declined")
    assert masked == "card [ACCOUNT_NUMBER] was declined"
    assert [f.kind for f in findings] == [pii.ACCOUNT_NUMBER]


def test_luhn_and_iban_checks() -> None:
    assert pii.luhn_valid("4111111111111111") and not pii.luhn_valid("4111111111111112")
    assert pii.iban_valid("GB82 WEST 1234 5698 7654 32") and not pii.iban_valid("GB82 WEST 1234 5698 7654 33")


def test_positions_point_at_the_placeholders_in_the_masked_text() -> None:
    masked, findings = pii.redact(f"card {VISA}, mail a@b.co, phone 655 123 456.")
    assert masked == "card [CARD_NUMBER], mail [EMAIL_ADDRESS], phone [PHONE_NUMBER]."
    assert [masked[f.start:f.end] for f in findings] == ["[CARD_NUMBER]", "[EMAIL_ADDRESS]", "[PHONE_NUMBER]"]


def segments_masked(*said: str) -> list[tuple[str, list[pii.Finding]]]:
    """Each segment masked, read with the ones before it as a call's segments are."""
    redactor = pii.SegmentRedactor()
    for text in said:
        redactor.add(text)
    return [redactor.masked(k) for k in range(len(said))]


def test_a_security_code_named_at_the_end_of_one_segment_is_masked_at_the_start_of_the_next() -> None:
    # How Whisper cut "… and the security code is seven four two." at a pause.
    before = "The expiry date is 1227 and the security code"
    (kept, none), (masked, findings) = segments_masked(before, "with this 742.")
    assert (kept, none) == (before, [])
    assert masked == "with this [SECURITY_CODE]." and [f.kind for f in findings] == [pii.SECURITY_CODE]
    assert masked[findings[0].start:findings[0].end] == "[SECURITY_CODE]"
    assert pii.redact("with this 742.") == ("with this 742.", [])  # alone, nothing names it
    assert segments_masked("call me on 655 1", "12 Main Street")[1] == ("12 Main Street", [])


def test_a_card_read_out_over_two_segments_is_masked_in_both() -> None:
    # How Whisper cut "4111, 1111, 1111, 1111" at the caller's breath: neither half is a card alone.
    before = "Okay, it is 4111, 1111,"
    assert pii.redact(before) == (before, [])
    assert [masked for masked, _ in segments_masked(before, "1111, 1111. Expires in December.")] == [
        "Okay, it is [CARD_NUMBER],", "[CARD_NUMBER]. Expires in December."]


def test_a_card_read_out_a_group_a_segment_is_masked_in_every_segment_once_the_last_group_comes() -> None:
    # How Whisper cut "4111. 1111. 1111. 1111." where the caller paused: no segment, and no two, hold a card.
    said = ["Sure, here it is.", "4111.", "1111.", "1111.", "1111.", "Thanks."]
    redactor = pii.SegmentRedactor()
    changed = [redactor.add(text) for text in said]
    assert changed == [[], [], [], [], [1, 2, 3, 4], []]
    assert [redactor.masked(k)[0] for k in range(len(said))] == [
        "Sure, here it is.", "[CARD_NUMBER].", "[CARD_NUMBER].", "[CARD_NUMBER].", "[CARD_NUMBER].", "Thanks."]
    assert redactor.masked(2)[1] == [pii.Finding(pii.CARD_NUMBER, 0, 13)]


# How a stereo call's segments come when the agent acknowledges each group the customer reads out.
READ_OUT_TO_AN_AGENT = [("agent", "Can I have the long number on the card?"), ("customer", "Sure."),
                        ("customer", "4111."), ("agent", "Okay."), ("customer", "1111."), ("agent", "Mm-hmm."),
                        ("customer", "1111."), ("agent", "Yes."), ("customer", "1111."),
                        ("agent", "And the security code?"), ("customer", "742.")]


def test_a_card_read_out_between_the_agents_acknowledgements_is_masked_in_each_of_the_callers_segments() -> None:
    redactor = pii.SegmentRedactor()
    changed = [redactor.add(text, speaker) for speaker, text in READ_OUT_TO_AN_AGENT[:9]]
    assert changed[-1] == [2, 4, 6, 8] and not any(changed[:-1])
    assert [redactor.masked(k)[0] for k in range(9)] == [
        "Can I have the long number on the card?", "Sure.", "[CARD_NUMBER].", "Okay.", "[CARD_NUMBER].", "Mm-hmm.",
        "[CARD_NUMBER].", "Yes.", "[CARD_NUMBER]."]


def test_a_security_code_the_agent_asks_for_is_masked_when_the_caller_says_it() -> None:
    redactor = pii.SegmentRedactor()
    for speaker, text in READ_OUT_TO_AN_AGENT:
        redactor.add(text, speaker)
    assert redactor.masked(9)[0] == "And the security code?"
    assert redactor.masked(10) == ("[SECURITY_CODE].", [pii.Finding(pii.SECURITY_CODE, 0, 15)])


def test_a_card_read_out_on_a_mono_call_between_the_agents_replies_is_masked_in_each_group() -> None:
    # One voice: the agent's replies come between the groups, and no four segments in a row hold the card.
    said = ["Can I have the long number on the card?", "Sure, it's 4111.", "Okay.", "1111.", "Mm-hmm, go on.",
            "1111.", "Okay, and the next four?", "1111.", "Thank you."]
    assert [masked for masked, _ in segments_masked(*said)] == [
        "Can I have the long number on the card?", "Sure, it's [CARD_NUMBER].", "Okay.", "[CARD_NUMBER].",
        "Mm-hmm, go on.", "[CARD_NUMBER].", "Okay, and the next four?", "[CARD_NUMBER].", "Thank you."]


def test_a_card_read_out_in_words_over_more_of_the_callers_segments_than_are_read_together_is_masked_in_all(
        ) -> None:
    said = [("customer", "four one one one"), ("agent", "Yes."), ("customer", "one one"), ("customer", "one one"),
            ("agent", "Go on."), ("customer", "one one one one"), ("agent", "Okay."), ("customer", "one one"),
            ("customer", "one one.")]
    redactor = pii.SegmentRedactor()
    changed = [redactor.add(text, speaker) for speaker, text in said]
    assert changed[-1] == [0, 2, 3, 5, 7, 8] and not any(changed[:-1])
    assert [redactor.masked(k)[0] for k in (0, 1, 8)] == ["[CARD_NUMBER]", "Yes.", "[CARD_NUMBER]."]


def test_groups_taken_for_a_phone_number_until_the_last_group_comes_are_then_masked_as_the_card() -> None:
    # How Whisper base wrote a mono call (espeak voices) where the caller reads 4539 1488 0343 6467 to an agent.
    said = ["Can I have the long number on the card, please?", "Sure. It is 453-9", "Okay", "1488", "MM, then go on",
            "0343", "Okay and the last four", "6467", "Thank you"]
    redactor = pii.SegmentRedactor()
    changed = [redactor.add(text) for text in said[:4]]
    assert changed[3] == [1, 3] and redactor.masked(1)[0] == "Sure. It is [PHONE_NUMBER]"  # 8 digits so far
    changed += [redactor.add(text) for text in said[4:]]
    assert changed[5] == [5] and changed[7] == [1, 3, 5, 7]
    assert [redactor.masked(k)[1][0].kind for k in (1, 3, 5, 7)] == [pii.CARD_NUMBER] * 4
    assert [redactor.masked(k)[0] for k in (1, 3, 5, 7)] == [
        "Sure. It is [CARD_NUMBER]", "[CARD_NUMBER]", "[CARD_NUMBER]", "[CARD_NUMBER]"]


def test_figures_with_talk_between_them_are_not_read_as_one_number() -> None:
    said = ["Room 4111.", "The heating in that room has not worked since Monday.", "1111.", "1111.", "1111."]
    assert segments_masked(*said) == [(text, []) for text in said]


def test_the_first_open_segment_is_the_first_with_figures_unmasked_that_the_next_segment_may_be_read_with() -> None:
    redactor = pii.SegmentRedactor()
    for text in ["Can I have the card?", "4111.", "Okay.", "Go on.", "Yes, go on.", "Right."]:
        redactor.add(text)
    assert redactor.first_open() == 1  # four short replies later, the next group may still make "4111." a card
    for text in ["1111.", "1111.", "1111."]:
        redactor.add(text)
    assert redactor.first_open() == 9  # the card is masked: nothing left to change
    redactor.add("I also wanted to ask you about the letter that you sent me last week.")
    redactor.add("It was for 250 euros.")
    assert redactor.first_open() == 10  # "250" may be the start of a number the next segments go on with
    for text in ["I have never been charged that much before.", "Nobody told me why.", "Can you check it?"]:
        redactor.add(text)
    assert redactor.first_open() == 14  # three segments without figures since: settled


def test_segments_read_together_mask_only_what_they_complete() -> None:
    said = ["I called in 2019,", "2020,", "2021 and 2022.", "The security code", "is 742.", "Room 12, 14."]
    redactor = pii.SegmentRedactor()
    assert [redactor.add(text) for text in said] == [[], [], [], [], [4], []]
    assert [redactor.masked(k)[0] for k in range(len(said))] == [
        "I called in 2019,", "2020,", "2021 and 2022.", "The security code", "is [SECURITY_CODE].", "Room 12, 14."]


def test_a_card_among_other_numbers_is_masked_alone() -> None:
    masked, findings = pii.redact("4111, 1111, 1111, 1111, 12, 27, and 2 cards")
    assert masked == "[CARD_NUMBER], 12, 27, and 2 cards" and [f.kind for f in findings] == [pii.CARD_NUMBER]


def test_masking_masked_text_again_changes_nothing_and_finds_the_same_placeholders() -> None:
    said = f"Card {VISA}, the security code is 742, mail ana.lopez@example.com, IBAN GB82 WEST 1234 5698 7654 32."
    once = pii.redact(said)
    assert [f.kind for f in once[1]] == [pii.CARD_NUMBER, pii.SECURITY_CODE, pii.EMAIL_ADDRESS, pii.IBAN]
    assert pii.redact(once[0]) == once
    assert segments_masked("the security code", "[SECURITY_CODE].")[1] == ("[SECURITY_CODE].", [pii.Finding(
        pii.SECURITY_CODE, 0, 15)])
    assert pii.redact("[NOT_A_KIND] [card_number]") == ("[NOT_A_KIND] [card_number]", [])
