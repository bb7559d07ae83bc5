"""The prompts the demo LenVM was trained and evaluated on (written for this repo).

A mix of what length control meets in practice: short factual QA (answers of a few dozen
tokens), instructions that ask for a given length ("in 3 sentences", "about 200 words"),
open-ended explanations, and step-by-step reasoning (arithmetic word problems). Built
deterministically from the lists below; the held-out split is by prompt (20% of each category),
so no held-out prompt is ever seen in training, not even with other samples.

`python -m sglang_lenvm.training.demo_prompts data/demo_prompts` writes train.jsonl and
heldout.jsonl ({"id", "category", "messages"} per line).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

QA = [
    "What is the capital of Japan?", "Who wrote Romeo and Juliet?",
    "How many legs does a spider have?", "What is the boiling point of water in Celsius?",
    "Which planet is known as the Red Planet?", "What is the largest ocean on Earth?",
    "Who painted the Mona Lisa?", "What gas do plants absorb from the air?",
    "How many days are in a leap year?", "What is the chemical symbol for gold?",
    "What is the square root of 81?", "Which language is spoken in Brazil?",
    "What is the tallest mountain in the world?", "Who was the first person to walk on the Moon?",
    "What is the freezing point of water in Fahrenheit?", "How many continents are there?",
    "What is the capital of Australia?", "What do bees make?",
    "What is the longest river in Africa?", "How many sides does a hexagon have?",
    "What is the main ingredient of guacamole?", "Which animal is known as the king of the jungle?",
    "What is the smallest prime number?", "What is H2O commonly called?",
    "In which country are the pyramids of Giza?", "What color do you get by mixing blue and yellow?",
    "What is the currency of the United Kingdom?", "How many minutes are in an hour?",
    "Who developed the theory of relativity?", "What is the hardest natural substance?",
    "What is the capital of Canada?", "Which organ pumps blood through the body?",
    "How many strings does a standard guitar have?", "What is the largest mammal?",
    "What is the opposite of 'ancient'?", "Which season comes after winter?",
    "What is 15 multiplied by 4?", "Who invented the telephone?",
    "What is the capital of Italy?", "Which metal is liquid at room temperature?",
    "What is the plural of 'mouse'?", "How many players are on a soccer team on the field?",
    "What is the main language of Mexico?", "Which instrument has 88 keys?",
    "What is the speed of light, approximately?", "What is the capital of Egypt?",
    "Which bird is a symbol of peace?", "What do caterpillars turn into?",
    "How many hours are in a day?", "What is the largest planet in our solar system?",
    "What is the capital of Spain?", "Who wrote 'Pride and Prejudice'?",
    "What is a baby cat called?", "What is the primary source of energy for Earth?",
    "What shape has three sides?", "Which continent is Kenya in?",
    "What is the chemical symbol for sodium?", "How many weeks are in a year?",
    "What is the capital of Germany?", "What is the name of our galaxy?",
]
DEFINE = [
    "photosynthesis", "gravity", "democracy", "an algorithm", "inflation", "a volcano",
    "evolution", "a metaphor", "the internet", "a vaccine", "climate", "an atom",
    "friendship", "a budget", "recycling", "a protein", "electricity", "a haiku",
]
TOPICS = [
    "the ocean", "a rainy day in the city", "learning to ride a bicycle", "the importance of sleep",
    "a trip to the mountains", "friendship", "artificial intelligence", "a lost cat",
    "the history of bread", "space exploration", "a small bakery", "winter mornings",
    "the benefits of reading", "a robot who wants to paint", "healthy breakfast habits",
    "an old lighthouse", "climate change", "a first day at school", "city gardens", "the moon",
    "a dragon who is afraid of fire", "working from home", "the water cycle", "a summer festival",
]
FORMS = ["story", "poem", "paragraph", "short essay", "blog post", "letter to a friend",
         "product description", "speech"]
WORDS = [20, 30, 50, 80, 100, 150, 200, 300]
SENTENCES = [1, 2, 3, 5, 8]
LIST_OF = ["fruits", "countries in Europe", "tips for studying", "ways to save money",
           "animals that live in the ocean", "hobbies", "programming languages",
           "things to pack for a beach trip", "healthy snacks", "famous scientists"]
EXPLAIN = [
    "Explain how a rainbow forms.", "Explain how vaccines train the immune system.",
    "How does a refrigerator keep food cold?", "Why is the sky blue?",
    "Explain how the stock market works.", "How do airplanes stay in the air?",
    "Give me some tips for writing a good resume.", "How can I improve my sleep?",
    "Explain the difference between weather and climate.", "What are the benefits of exercise?",
    "How does the internet send data from one computer to another?",
    "Describe the life cycle of a butterfly.", "What should I consider when adopting a dog?",
    "Explain what a computer program is to a child.", "How do I make a cup of tea?",
    "Compare cats and dogs as pets.", "What causes earthquakes?",
    "Explain why recycling matters.", "How do plants grow from seeds?",
    "Give advice to someone starting their first job.", "Describe how to plan a birthday party.",
    "What are the main causes of the French Revolution?", "How does a battery store energy?",
    "Explain what machine learning is.", "Tell me about the history of the Olympic Games.",
    "How do I start learning to play the piano?", "What makes a good leader?",
    "Explain how the heart works.", "Describe a healthy weekly meal plan.",
    "How do bees make honey?",
]
NAMES = ["Tom", "Anna", "Ravi", "Maria", "Leo", "Sara", "Ken", "Mia", "Omar", "Lily"]
ITEMS = ["apples", "pencils", "marbles", "books", "cookies", "stickers", "coins", "cards"]


def _reasoning(rng: random.Random) -> str:
    a, b, c = rng.randint(3, 40), rng.randint(2, 25), rng.randint(2, 9)
    name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        q = (f"{name} has {a} {item}. {other} gives {name} {b} more, and then {name} gives away "
             f"{c}. How many {item} does {name} have now?")
    elif kind == 1:
        q = (f"A box holds {c} {item}. {name} has {a} boxes and {b} loose {item}. "
             f"How many {item} are there in total?")
    elif kind == 2:
        q = (f"A train travels at {a + 20} km per hour for {c} hours. How far does it travel?")
    elif kind == 3:
        q = (f"{name} buys {c} notebooks at {b} dollars each and pays with a {100 if c * b < 100 else 500}"
             f" dollar bill. How much change does {name} get?")
    elif kind == 4:
        q = (f"The sum of two numbers is {a + b} and their difference is {abs(a - b)}. "
             f"What are the two numbers?")
    else:
        q = (f"{name} reads {c} pages every day. The book has {a * c + b} pages. "
             f"How many days does {name} need to finish the book?")
    style = rng.choice(["Think step by step.", "Explain your reasoning step by step.",
                        "Show your work.", "Answer with just the number.",
                        "Solve this and explain briefly."])
    return f"{q} {style}"


def build() -> list[dict]:
    rng = random.Random(20250101)
    rows: list[tuple[str, str]] = []
    rows += [("short_qa", q) for q in QA]
    rows += [("short_qa", f"Define {d} in one sentence.") for d in DEFINE]
    for _ in range(70):
        t, f, w = rng.choice(TOPICS), rng.choice(FORMS), rng.choice(WORDS)
        rows.append(("length_instruction", rng.choice([
            f"Write a {w}-word {f} about {t}.",
            f"Write a {f} about {t} in about {w} words.",
            f"In no more than {w} words, write a {f} about {t}.",
        ])))
    for _ in range(25):
        t, s = rng.choice(TOPICS), rng.choice(SENTENCES)
        rows.append(("length_instruction",
                     f"Describe {t} in {s} sentence{'s' if s > 1 else ''}."))
    for _ in range(15):
        k = rng.choice([3, 5, 7, 10])
        rows.append(("length_instruction", f"List {k} {rng.choice(LIST_OF)}."))
    rows += [("open_ended", q) for q in EXPLAIN]
    rows += [("reasoning", _reasoning(rng)) for _ in range(70)]
    # deduplicate, keep order
    seen, out = set(), []
    for cat, text in rows:
        if text not in seen:
            seen.add(text)
            out.append({"id": f"{cat}-{len(out):04d}", "category": cat,
                        "messages": [{"role": "user", "content": text}]})
    return out


def split(rows: list[dict], heldout_frac: float = 0.2, seed: int = 0):
    rng = random.Random(seed)
    train, held = [], []
    for cat in sorted({r["category"] for r in rows}):
        group = [r for r in rows if r["category"] == cat]
        rng.shuffle(group)
        k = round(len(group) * heldout_frac)
        held += group[:k]
        train += group[k:]
    return train, held


def main(out_dir: str) -> None:
    train, held = split(build())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        with open(out / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"{len(train)} train, {len(held)} held-out prompts -> {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/demo_prompts")
