"""Writes the two example datasets (run from anywhere; output beside this file).

Both use the ``messages`` shape, so training sees the model's chat template exactly as
``llmcluster generate --chat`` sends it, and both answer in a distinctive house style the
base model does not produce, so the adapter's effect is easy to see.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------- e-commerce
SHOP_SIGN = "Anything else I can help with? — Mia, Northwind Store Support"
SHOP_TOPICS = [
    (
        [
            "Where is my order {order}?",
            "Can you track order {order} for me?",
            "My order {order} hasn't arrived yet. What's going on?",
            "Any update on the delivery of {order}?",
        ],
        "📦 Order {order}: it shipped and is on its way. You can follow it any time under "
        "Account → Orders → Track. Standard delivery takes 3–5 business days.",
    ),
    (
        [
            "How do I return {item}?",
            "I want to send back {item}. How?",
            "Can I return {item} I bought last week?",
            "What's the return process for {item}?",
        ],
        "↩️ Returns: {item} can be returned within 30 days. Go to Account → Orders → Return "
        "item, print the free label and drop the parcel at any post office. Your refund "
        "follows within 5 business days of arrival.",
    ),
    (
        [
            "When will I get my refund for {order}?",
            "Refund for {order} still missing.",
            "I returned {order}, where is my money?",
        ],
        "💳 Refund for {order}: refunds go back to the original payment method within 5 "
        "business days after the return reaches our warehouse. Banks can take 2 more days.",
    ),
    (
        [
            "Do you ship to {country}?",
            "Can I order from {country}?",
            "Is delivery available in {country}?",
        ],
        "🌍 Shipping to {country}: yes, we deliver there in 5–9 business days. Duties and "
        "taxes are shown at checkout, so there are no surprises at the door.",
    ),
    (
        [
            "The {item} I received is broken.",
            "My {item} arrived damaged!",
            "{item} doesn't work out of the box.",
        ],
        "🛠️ Damaged item: sorry about your {item}! Send us a photo via Account → Orders → "
        "Report a problem and we ship a replacement right away — no need to return the "
        "broken one.",
    ),
    (
        [
            "Can I change the address on {order}?",
            "I entered the wrong address for {order}.",
            "Please update the shipping address of {order}.",
        ],
        "🏠 Address change for {order}: possible until the order ships. Open Account → "
        "Orders → Edit address; if the button is grey, the parcel has already left.",
    ),
    (
        [
            "How do I cancel {order}?",
            "Please cancel my order {order}.",
            "I don't want {order} anymore, can I cancel?",
        ],
        "❌ Cancelling {order}: orders can be cancelled within 2 hours of purchase under "
        "Account → Orders → Cancel. After that, just refuse the delivery or return it free.",
    ),
    (
        [
            "Is {item} back in stock soon?",
            "When will {item} be available again?",
            "{item} is sold out — any restock date?",
        ],
        "🔔 Restock: {item} is expected back within 2–3 weeks. Tap 'Notify me' on the "
        "product page and we email you the moment it is available.",
    ),
]
ITEMS = [
    "the wireless headphones",
    "a pair of running shoes",
    "the blue winter jacket",
    "the coffee grinder",
    "a desk lamp",
    "the yoga mat",
    "the phone case",
    "the smart watch",
    "a backpack",
    "the kitchen scale",
]
COUNTRIES = ["Canada", "Germany", "Japan", "Brazil", "Australia", "Kenya", "Mexico", "Norway"]


def shop_examples(rng: random.Random, n: int) -> list[dict]:
    out, seen = [], set()
    while len(out) < n:
        questions, answer = rng.choice(SHOP_TOPICS)
        fill = {
            "order": f"#NW-{rng.randint(10000, 99999)}",
            "item": rng.choice(ITEMS),
            "country": rng.choice(COUNTRIES),
        }
        q = rng.choice(questions).format(**fill)
        q = q[0].upper() + q[1:]
        if q in seen:
            continue
        seen.add(q)
        a = "Thanks for reaching out! " + answer.format(**fill) + " " + SHOP_SIGN
        out.append(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        )
    return out


# --------------------------------------------------------------------- medical
MED_DISCLAIMER = (
    "⚕️ This is general information, not a diagnosis. Please consult a doctor or "
    "pharmacist about your own situation — and call emergency services if symptoms are severe."
)
MED_TOPICS = {
    "a common cold": (
        "usually caused by viruses and clears up in 7–10 days",
        "rest, fluids and saline nasal spray help most people",
    ),
    "a tension headache": (
        "often linked to stress, poor sleep or long screen time",
        "regular breaks, water and a quiet dark room can help",
    ),
    "seasonal allergies": (
        "a reaction of the immune system to pollen",
        "keeping windows closed on high-pollen days and rinsing the nose help",
    ),
    "mild dehydration": (
        "losing more fluid than you take in, e.g. in heat or with fever",
        "sipping water or an oral rehydration solution regularly helps",
    ),
    "heartburn": (
        "stomach acid flowing back into the food pipe",
        "smaller meals and not lying down right after eating help",
    ),
    "a sprained ankle": (
        "a stretched or torn ligament, often from twisting the foot",
        "rest, ice, compression and elevation (RICE) in the first days help",
    ),
    "trouble sleeping": (
        "common with stress, caffeine or irregular schedules",
        "a fixed bedtime and no screens in the last hour help many people",
    ),
    "a sore throat": (
        "mostly viral and improves within a week",
        "warm drinks, honey (not for babies) and lozenges soothe it",
    ),
    "high blood pressure": (
        "often has no symptoms and is found at routine checks",
        "less salt, regular activity and limiting alcohol help",
    ),
    "a mild fever": (
        "the body's normal response to infection",
        "rest and fluids help; watch how long it lasts and how high it gets",
    ),
}
MED_QUESTIONS = [
    "What causes {t}?",
    "I think I have {t}. What should I know?",
    "How can I deal with {t} at home?",
    "Is {t} something to worry about?",
    "Can you tell me about {t}?",
    "What helps with {t}?",
    "Any tips for {t}?",
    "My partner has {t}. What can we do?",
]
MED_WARNING = {
    "a common cold": "it lasts more than 10 days or breathing becomes hard",
    "a tension headache": "it is sudden and severe, or comes with fever, stiff neck or confusion",
    "seasonal allergies": "you notice wheezing or swelling of the lips or face",
    "mild dehydration": "there is confusion, fainting or no urine for 8 hours",
    "heartburn": "there is chest pain, trouble swallowing or black stools",
    "a sprained ankle": "you cannot put any weight on it or it looks deformed",
    "trouble sleeping": "it lasts for weeks and affects your daytime life",
    "a sore throat": "swallowing or breathing becomes difficult",
    "high blood pressure": "you get chest pain, a severe headache or vision changes",
    "a mild fever": "it goes above 39.5 °C or lasts more than 3 days",
}


def med_examples(rng: random.Random, n: int) -> list[dict]:
    pairs = [(t, q) for t in MED_TOPICS for q in MED_QUESTIONS]
    rng.shuffle(pairs)
    out = []
    for topic, question in pairs[:n]:
        cause, care = MED_TOPICS[topic]
        q = question.format(t=topic)
        a = (
            f"General information about {topic}: it is {cause}. Self-care: {care}. "
            f"See a professional promptly if {MED_WARNING[topic]}.\n{MED_DISCLAIMER}"
        )
        out.append(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        )
    return out


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    write(HERE / "ecommerce" / "train.jsonl", shop_examples(random.Random(7), 80))
    write(HERE / "medical" / "train.jsonl", med_examples(random.Random(11), 72))
