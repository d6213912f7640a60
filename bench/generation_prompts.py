"""The prompts of `python -m bench.generation`: a short one (10 tokens with the exporter's Gemma
tokenizer, BOS included) and a long one (the first --long-tokens tokens of LONG, which has 546)
for prefill, time to first token and decode speed, and eight short ones for the concurrent streams.
Plain prose, fixed, so that every engine and every run sees the same inputs."""

SHORT = "Once upon a time, in a small village"

LONG = (
    "The history of the lighthouse is, in many ways, the history of trade by sea. Long before "
    "anyone drew accurate charts, sailors who worked the coasts of the Mediterranean learned to "
    "fear the last few miles of a voyage more than the open water. Reefs, sandbanks and rocky "
    "headlands claimed more ships than storms did, and most of those losses happened at night, "
    "within sight of a harbour. The earliest answer was simple: a fire kept burning on a hill "
    "above the port, tended by someone paid by the town or by the merchants who used it. The "
    "Pharos of Alexandria, finished in the third century before our era, turned that fire into "
    "a monument. It stood on an island at the mouth of the harbour, and ancient writers claimed "
    "that its light could be seen from far out at sea, although they rarely agreed on the "
    "distance. For centuries after it fell, the word for lighthouse in several languages still "
    "echoed its name.\n\n"
    "The Romans built lights along the routes of their empire, from the Black Sea to the coast "
    "of Britain, and some of their towers were still in use a thousand years later. After them, "
    "progress was slow. A medieval light was usually a brazier of wood or coal on top of a "
    "stone tower, smoky and unreliable, and it went out whenever the keeper fell asleep or the "
    "fuel ran short. Candles and oil lamps were cleaner but far weaker, and much of their light "
    "was lost, shining up into the sky or down onto the rocks instead of out towards the ships "
    "that needed it.\n\n"
    "Everything changed with better optics. In the eighteenth century, engineers began placing "
    "polished metal reflectors behind their lamps, which gathered the light into a beam. Then, "
    "in the eighteen twenties, the French physicist Augustin Fresnel designed a lens made of "
    "concentric rings of glass prisms. It was lighter and thinner than a solid lens of the same "
    "power, and it caught almost all the light of a single flame and sent it towards the "
    "horizon. Within a few decades, his lenses were being installed on coasts all over the "
    "world. Each lighthouse was also given its own pattern of flashes, so that a navigator who "
    "counted the seconds between them could tell exactly which light he was looking at, and "
    "therefore where his ship was.\n\n"
    "The life of a keeper remained hard and lonely. Keepers trimmed the wicks, polished the "
    "brass and the glass, wound the clockwork that turned the lens, and wrote the weather in "
    "the log every few hours. On the most exposed rocks, they could be cut off for weeks at a "
    "time by the waves. Today almost every light in the world is automatic, watched from far "
    "away, and the keepers are gone, but the towers still stand, and ships still look for them"
)

STREAMS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "Les plus beaux endroits de Paris sont",
    "Three tips for staying healthy are",
    "The theory of relativity explains that",
    "In 1969, the first humans to walk on the Moon",
    "A good recipe for pancakes needs flour, eggs, milk and",
]
