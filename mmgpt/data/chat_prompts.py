"""General chat prompts, for keeping a pretrained LM's own answers while it learns to see.

Fine-tuning a chat LM on image tasks whose answers are one word ("red", "two") also teaches it to answer *text*
questions in one word: SmolLM2 went from "The capital of France is Paris." to "France". The usual remedy is
replay: mix in general prompts answered by the model itself before fine-tuning (self-distillation: no outside
data, nothing downloaded), so that the fine-tuning keeps those answers. ``scripts/chat_replay.py`` generates the
answers and scores how much of them a fine-tuned model keeps.

``chat_prompts("train")`` gives a few hundred templated prompts to replay; ``chat_prompts("test")`` a fixed,
hand-written set that no training prompt repeats, to measure what was kept on prompts never replayed.
"""

from __future__ import annotations

# Held out: never replayed, so that agreement on them measures generalisation, not memorised answers. The first
# eight are also benchmarks/smollm2.py's quality prompts.
TEST_PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Give me three tips for learning a new language.",
    "Write a haiku about the ocean.",
    "What is 12 times 7?",
    "Summarize the plot of Romeo and Juliet.",
    "How do I make a cup of tea?",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "What is the largest planet in the solar system?",
    "Who wrote the play Hamlet?",
    "What is the boiling point of water in Celsius?",
    "Name three primary colors.",
    "What does a thermometer measure?",
    "Write one sentence about autumn leaves.",
    "What is the opposite of hot?",
    "How many days are in a week?",
    "What do bees make?",
    "Give me a synonym for happy.",
    "What is the chemical symbol for gold?",
    "Why do we need sleep?",
    "What is a noun?",
    "Suggest a name for a pet goldfish.",
    "What is the freezing point of water in Fahrenheit?",
    "How do plants get water?",
    "What language is spoken in Brazil?",
    "Tell me a fun fact about octopuses.",
    "What is the square root of 81?",
    "How can I stay focused while studying?",
    "What is the main ingredient of guacamole?",
    "Describe a rainbow in one sentence.",
    "What is gravity?",
]

# Train prompts: templates crossed with fillers. Each pair of lists is small on purpose; it is the variety of
# *kinds* of request (facts, explanations, lists, short writing, arithmetic, advice) that carries the style.
_TEMPLATES: list[tuple[str, list[str]]] = [
    ("What is the capital of {}?", ["Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Kenya", "Peru",
                                    "Norway", "India", "Mexico", "Australia", "Greece", "Chile", "Poland"]),
    ("How many legs does {} have?", ["a dog", "an ant", "a bird", "a horse", "a snake", "a crab", "a human",
                                    "a beetle", "an octopus", "a cat"]),
    ("Explain what {} is in simple words.", ["a volcano", "electricity", "a computer", "democracy", "a cloud",
                                             "an atom", "a vaccine", "the internet", "inflation", "a battery",
                                             "an earthquake", "a glacier"]),
    ("Why do {}?", ["leaves change color in autumn", "birds migrate", "cats purr", "we have seasons",
                    "stars twinkle", "onions make us cry", "ice cubes float", "bread rise", "we yawn",
                    "tides happen"]),
    ("Give me three tips for {}.", ["saving money", "sleeping better", "writing an essay", "staying healthy",
                                    "cooking rice", "running a marathon", "keeping a plant alive",
                                    "public speaking", "learning to code", "reducing stress"]),
    ("Write a short poem about {}.", ["the moon", "a cat", "rain", "the mountains", "friendship", "winter",
                                      "a garden", "the city at night", "coffee", "the sea"]),
    ("Write one sentence about {}.", ["the sun", "a library", "a forest", "a busy market", "a snowy day",
                                      "a train journey", "music", "the desert", "a lighthouse", "a bakery"]),
    ("What is {} plus {}?", ["7|5", "12|9", "23|19", "40|60", "8|15", "101|99", "6|27", "15|15"]),
    ("What is {} times {}?", ["6|8", "9|9", "11|4", "3|14", "5|20", "7|6", "12|12", "25|4"]),
    ("What is the difference between {} and {}?", ["a fruit|a vegetable", "weather|climate", "a lake|a sea",
                                                   "a virus|a bacterium", "speed|velocity", "a town|a city",
                                                   "a frog|a toad", "an ocean|a river"]),
    ("Name three {}.", ["fruits", "musical instruments", "planets", "mammals", "countries in Europe",
                        "kinds of trees", "sports", "vegetables", "birds", "programming languages"]),
    ("How do I {}?", ["boil an egg", "tie a shoelace", "plant a seed", "make a paper airplane", "wash my hands",
                      "write a thank-you note", "start a journal", "clean a window", "fold a shirt",
                      "make lemonade"]),
    ("What is the opposite of {}?", ["big", "fast", "happy", "light", "early", "open", "empty", "strong",
                                     "young", "loud"]),
    ("Who was {}?", ["Albert Einstein", "Marie Curie", "Leonardo da Vinci", "William Shakespeare",
                     "Isaac Newton", "Cleopatra", "Mozart", "Charles Darwin"]),
    ("What color is {}?", ["a lemon", "the sky", "grass", "a flamingo", "chocolate", "a cucumber", "coal",
                           "a pumpkin"]),
    ("Tell me a fun fact about {}.", ["elephants", "the moon", "honey", "penguins", "the human brain",
                                      "volcanoes", "sharks", "butterflies"]),
    ("Describe {} in one sentence.", ["a thunderstorm", "a sunrise", "a waterfall", "a city park", "the ocean",
                                      "a campfire", "a snowflake", "a windmill"]),
    ("What is the main ingredient of {}?", ["bread", "pesto", "hummus", "an omelette", "french fries",
                                            "popcorn", "butter", "tofu"]),
    ("Translate '{}' into French.", ["hello", "thank you", "good night", "cat", "water", "friend"]),
    ("Is {} a mammal?", ["a whale", "a shark", "a bat", "a penguin", "a dolphin", "a lizard"]),
]


def chat_prompts(split: str) -> list[str]:
    """General chat prompts: ``"train"`` (templated, a few hundred) or ``"test"`` (held out, hand-written).

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        Distinct prompts in a fixed order; no train prompt is a test prompt.
    """
    if split == "test":
        return list(TEST_PROMPTS)
    if split != "train":
        raise ValueError(f"chat_prompts: split must be 'train' or 'test', got {split!r}")
    held_out = set(TEST_PROMPTS)
    prompts = (
        template.format(*filler.split("|")) for template, fillers in _TEMPLATES for filler in fillers
    )
    return [p for p in dict.fromkeys(prompts) if p not in held_out]

