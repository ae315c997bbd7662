"""Writes data/bank.jsonl: ILLUSTRATIVE banking-intent records, generated for the fedllm project.

Every record is made up from templates below: the banks (Alder, Birchway, Cobalt, Driftwood) do
not exist, and no message comes from or describes a real customer. Stdlib only, fixed seed: running
it again writes the same file byte for byte (tests/unit/test_bank_scenario.py checks that).

    python simulations/bank/make_data.py            # rewrites simulations/bank/data/bank.jsonl
    python simulations/bank/make_data.py --output /tmp/bank.jsonl

Each record: {"instruction": INSTRUCTION, "input": a customer's message, "output": its intent (one
of INTENTS), "bank": the bank id (the scenario's natural-id partition key)}. Each bank has its own
size and intent mix (non-IID), set in BANKS; the counts per intent are the largest-remainder
rounding of size x weight, so they are exact and documented in data/README.md.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20261215
OUTPUT = Path(__file__).resolve().parent / "data" / "bank.jsonl"

INTENTS = ("lost", "delivery", "transfer", "dispute", "address", "open", "close", "loan", "mortgage", "balance",
           "atm", "fraud")
INSTRUCTION = ("Classify the bank customer's message. Answer with one intent: " + ", ".join(INTENTS) + ".")

# bank id -> (records, weight per intent in INTENTS order): a retail bank heavy on cards and ATMs, a
# mortgage lender heavy on loans, a business bank heavy on transfers and disputes, a small credit
# union with a broad mix.
BANKS = {
    "alder-retail": (380, (14, 12, 6, 8, 3, 3, 2, 2, 0, 10, 12, 10)),
    "birchway-mortgage": (170, (1, 0, 2, 2, 10, 2, 3, 18, 34, 6, 0, 2)),
    "cobalt-business": (260, (3, 2, 24, 14, 3, 8, 5, 8, 0, 6, 2, 12)),
    "driftwood-cu": (140, (6, 5, 8, 6, 6, 8, 6, 8, 6, 8, 6, 6)),
}

SLOTS = {
    "amount": ["$20", "$45.99", "$60", "$100", "$120", "$250", "$300", "$480.50", "$1,000", "$1,250", "$2,400",
               "$5,000", "£80", "£200", "€150", "€75.20", "40 dollars", "two hundred dollars", "$12.34", "$899"],
    "merchant": ["Quickmart", "BlueLeaf Grocers", "Northline Rail", "PixelPlay", "Sunny Side Cafe", "Metro Fuel",
                 "StreamBox", "HomeGoods Depot", "FitZone Gym", "Copper Kettle", "RideNow", "BookNook",
                 "Greenway Pharmacy", "CloudTunes", "Harbor Hotel", "an online shop", "a petrol station",
                 "a restaurant", "a hotel", "a parking app"],
    "date": ["yesterday", "last night", "on Monday", "on Friday", "this morning", "two days ago", "last week",
             "on the 3rd", "on 12 March", "on the 28th", "over the weekend", "on 1/14", "a week ago", "today"],
    "place": ["the mall", "the train station", "the airport", "Main Street", "the supermarket", "a gas station",
              "the branch on 5th Ave", "the hospital lobby", "my office building", "the campus"],
    "card": ["card", "debit card", "credit card", "visa card", "bank card", "contactless card", "new card",
             "replacement card"],
    "account": ["checking account", "savings account", "current account", "joint account", "business account",
                "student account", "everyday account"],
    "person": ["my landlord", "my sister", "a supplier", "my contractor", "a friend", "my daughter", "the seller",
               "our vendor", "my accountant", "my brother"],
    "days": ["3", "5", "7", "10", "two", "three", "ten", "fourteen"],
    "loan": ["personal loan", "car loan", "small loan", "home improvement loan", "business loan", "loan",
             "student loan", "debt consolidation loan"],
    "city": ["Springfield", "Riverton", "Lakeview", "Oakdale", "Fairhaven", "Millbrook", "Westport", "Ashford"],
}

TEMPLATES = {
    "lost": [
        "I lost my {card} {date}", "i think i left my {card} at {place}, can you block it",
        "my wallet was stolen {date} with my {card} in it", "Can't find my {card} anywhere. Please freeze it.",
        "how do i report a lost {card}", "I dropped my {card} somewhere near {place}",
        "lost card, need a replacement asap", "My {card} is missing since {date}, what should I do?",
        "please cancel my {card}, I misplaced it", "Someone stole my bag at {place} and my {card} was inside",
        "I can't remember where I put my {card}, can you lock it for now",
        "left my {card} in a taxi {date}", "need to block my {card}, it's gone",
    ],
    "delivery": [
        "my {card} still hasn't arrived", "I ordered a {card} {days} days ago and nothing came in the post",
        "When will my {card} be delivered?", "still waiting on the {card} you sent {date}",
        "the {card} never showed up in the mail", "how long does it take for a {card} to arrive",
        "you said my {card} was dispatched but I haven't received it", "Where is my {card}? It's been {days} days.",
        "Can you track the {card} you mailed to me", "no sign of my {card} yet, is it delayed?",
        "my replacement card has not come, it was supposed to be here {date}",
        "did you send my {card} to my old address? it hasn't arrived",
    ],
    "transfer": [
        "my transfer of {amount} to {person} failed", "I sent {amount} {date} and it bounced back",
        "why was my transfer declined?", "The payment to {person} says failed, but the money left my {account}",
        "wire transfer of {amount} hasn't reached {person}", "my bank transfer is stuck as pending since {date}",
        "I tried to send {amount} to {person} and got an error", "transfer rejected, what does that mean",
        "The {amount} I moved to my {account} never arrived", "international transfer failed {date}, please check",
        "{person} says they never got the {amount} I sent", "payment to {person} keeps failing",
    ],
    "dispute": [
        "{merchant} charged me twice for the same purchase", "I want to dispute a charge of {amount} from {merchant}",
        "I was charged {amount} by {merchant} but I returned the item", "how do I dispute a transaction",
        "{merchant} billed me {amount} {date} for something I cancelled",
        "the amount on my statement from {merchant} is wrong, I paid less",
        "I never got a refund from {merchant} for {amount}", "wrong amount charged at {merchant}, it should be less",
        "I'd like to challenge a payment to {merchant}", "subscription from {merchant} charged me after I cancelled",
        "duplicate charge of {amount} at {merchant} {date}", "{merchant} overcharged me, can you get my money back",
    ],
    "address": [
        "I moved, how do I update my address", "please change my address to {city}",
        "I need to update my mailing address", "we are moving to {city} next month, how do I change my details",
        "how can I change the address on my {account}", "new address: 14 Elm Road, {city}. Please update",
        "my statements go to my old address, can you fix it", "where do I change my home address in the app",
        "update my postal address please", "I have relocated to {city} and need my address changed",
        "change of address for my {account}",
    ],
    "open": [
        "I want to open a {account}", "how do I open a new {account}",
        "can I open a {account} online", "what do I need to open an account with you",
        "I'd like to open a {account} for my daughter", "looking to open a second {account}",
        "is it possible to open a {account} today at the branch in {city}",
        "sign me up for a {account} please", "what documents do I need for a new {account}",
        "How long does it take to open a {account}?", "we want to open a {account} for our company",
    ],
    "close": [
        "I want to close my {account}", "how do I close my {account}",
        "please close my {account} and send me the balance", "I'm moving banks, close everything",
        "can I close my {account} online", "cancel my {account}, I don't use it anymore",
        "what happens to my money if I close my {account}", "close the {account} I opened {date}",
        "I would like to shut down my {account}", "terminate my {account} please",
        "we no longer need the {account}, please close it",
    ],
    "loan": [
        "I'd like to apply for a {loan}", "how do I apply for a {loan} of {amount}",
        "can I get a {loan}", "what's the interest rate on a {loan}", "am I eligible for a {loan}",
        "I need to borrow {amount}", "how long does a {loan} application take",
        "what documents do I need for a {loan}", "check the status of my {loan} application",
        "can I borrow {amount} for a new car", "I want to take out a {loan} to cover some bills",
        "is a {loan} of {amount} possible with my income",
    ],
    "mortgage": [
        "what are your current mortgage rates", "how much is the interest on a 30 year fixed mortgage",
        "I want to remortgage my house", "can I lock in my mortgage rate", "will my mortgage rate go up",
        "what's the rate for a 5 year fixed mortgage", "my fixed mortgage ends {date}, what are my options",
        "how much could I borrow for a home in {city}", "compare fixed vs variable mortgage rates",
        "can you lower the rate on my mortgage", "thinking about buying a house in {city}, what's your mortgage rate",
        "when does my mortgage rate change", "refinance my mortgage at a better rate",
    ],
    "balance": [
        "what's my balance", "how much money is in my {account}", "check balance please",
        "can you tell me the balance of my {account}", "how much do I have left",
        "what is the available balance on my {account}", "my balance looks low, what is it exactly",
        "show me my current balance", "how much is in savings", "balance of my {account} as of {date}",
        "can I see how much money I have", "is my paycheck in my {account} yet, what's the balance",
    ],
    "atm": [
        "the ATM at {place} didn't give me my cash", "I withdrew {amount} but the machine gave me nothing",
        "ATM took my money but no cash came out", "cash machine at {place} charged me {amount} and gave no money",
        "the atm swallowed my {card} and didn't dispense", "I only got part of the {amount} I withdrew",
        "money was debited but the ATM didn't dispense it {date}", "ATM error, my account was charged {amount}",
        "machine at {place} said out of service after taking my card, no cash",
        "withdrawal of {amount} failed at the atm but my balance went down",
        "The cash point at {place} gave me less than I asked for",
    ],
    "fraud": [
        "there's a charge of {amount} from {merchant} that I did not make",
        "someone used my {card} without permission", "I think my account has been hacked",
        "I don't recognise a payment of {amount} {date}", "got a text asking for my PIN, is it a scam",
        "unknown transactions on my {account}", "someone is spending money with my {card} in {city}",
        "report fraud on my {account}", "I was scammed out of {amount} by a fake caller",
        "my card was used online at {merchant} but it wasn't me", "strange withdrawals I didn't authorise",
        "I think someone cloned my {card}",
    ],
}

OPENERS = ["", "", "", "", "Hi, ", "Hello, ", "hey ", "Good morning. ", "Hi there, ", "Excuse me, ", "help! "]
CLOSERS = ["", "", "", "", " thanks", " Thank you.", " pls help", " asap", " Thanks in advance!", "??", "."]


def with_typo(text: str, rng: random.Random) -> str:
    """One adjacent-letter swap inside a word of at least 4 letters (a typing slip)."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    j = rng.randrange(1, len(words[i]) - 2)
    w = words[i]
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def message(intent: str, rng: random.Random) -> str:
    """One customer message for ``intent``: a template, its slots filled, then casing and typo noise."""
    text = rng.choice(TEMPLATES[intent])
    while "{" in text:
        start = text.index("{")
        end = text.index("}", start)
        text = text[:start] + rng.choice(SLOTS[text[start + 1:end]]) + text[end + 1:]
    closer = rng.choice(CLOSERS)
    if text[-1] in ".?!" and closer in ("??", "."):
        closer = ""
    text = rng.choice(OPENERS) + text + closer
    roll = rng.random()
    if roll < 0.15:
        text = text.lower()
    elif roll < 0.20:
        text = text.upper()
    elif roll < 0.60:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.15:
        text = with_typo(text, rng)
    return text.strip()


def intent_counts(size: int, weights: tuple[int, ...]) -> dict[str, int]:
    """``size`` records over INTENTS in proportion to ``weights`` (largest remainder; ties by order)."""
    total = sum(weights)
    exact = [size * w / total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:size - sum(counts)]:
        counts[i] += 1
    return dict(zip(INTENTS, counts, strict=True))


def make_records(seed: int = SEED) -> list[dict[str, str]]:
    """Every bank's records, no message repeated in the whole file, shuffled together."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records = []
    for bank, (size, weights) in BANKS.items():
        for intent, count in intent_counts(size, weights).items():
            for _ in range(count):
                for _attempt in range(1000):
                    text = message(intent, rng)
                    if text.lower() not in seen:
                        break
                else:
                    raise RuntimeError(f"too few distinct messages for {intent!r}; add templates or slot values")
                seen.add(text.lower())
                records.append({"instruction": INSTRUCTION, "input": text, "output": intent, "bank": bank})
    rng.shuffle(records)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"where to write (default: {OUTPUT})")
    args = parser.parse_args()
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in make_records())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {text.count(chr(10))} records to {args.output}")


if __name__ == "__main__":
    main()
