"""Accuracy of select --language's language identification (lingua-language-detector, the
detector select builds: every language lingua knows, high-accuracy mode; and its low-accuracy
mode for comparison) on short alt-text-like captions written for this benchmark.

Captions: in each of 7 languages, 8 subjects x 6 scenes ("a black dog on the beach"), 48 full
captions, plus the 8 subjects alone (2-3 words: the hard case), 392 in all. Run:

    python benchmarks/langid_accuracy.py
"""

from __future__ import annotations

import time

SUBJECTS = {
    "en": ["a black dog", "two young children", "an old red bicycle", "a bowl of soup",
           "a wooden chair", "my grandmother", "a small white boat", "fresh bread"],
    "de": ["ein schwarzer Hund", "zwei kleine Kinder", "ein altes rotes Fahrrad",
           "eine Schüssel Suppe", "ein Holzstuhl", "meine Großmutter", "ein kleines weißes Boot",
           "frisches Brot"],
    "fr": ["un chien noir", "deux jeunes enfants", "un vieux vélo rouge", "un bol de soupe",
           "une chaise en bois", "ma grand-mère", "un petit bateau blanc", "du pain frais"],
    "es": ["un perro negro", "dos niños pequeños", "una bicicleta roja vieja",
           "un plato de sopa", "una silla de madera", "mi abuela", "un pequeño barco blanco",
           "pan recién hecho"],
    "it": ["un cane nero", "due bambini piccoli", "una vecchia bicicletta rossa",
           "una ciotola di zuppa", "una sedia di legno", "mia nonna", "una piccola barca bianca",
           "pane fresco"],
    "pt": ["um cão preto", "duas crianças pequenas", "uma bicicleta vermelha velha",
           "uma tigela de sopa", "uma cadeira de madeira", "a minha avó",
           "um pequeno barco branco", "pão fresco"],
    "nl": ["een zwarte hond", "twee kleine kinderen", "een oude rode fiets", "een kom soep",
           "een houten stoel", "mijn grootmoeder", "een klein wit bootje", "vers brood"],
}  # fmt: skip
SCENES = {
    "en": ["on the beach at sunset", "in front of the house", "next to the kitchen window",
           "during the winter holidays", "in a busy street of the city", "under a large tree"],
    "de": ["am Strand bei Sonnenuntergang", "vor dem Haus", "neben dem Küchenfenster",
           "während der Winterferien", "in einer belebten Straße der Stadt",
           "unter einem großen Baum"],
    "fr": ["sur la plage au coucher du soleil", "devant la maison", "à côté de la fenêtre de la "
           "cuisine", "pendant les vacances d'hiver", "dans une rue animée de la ville",
           "sous un grand arbre"],
    "es": ["en la playa al atardecer", "delante de la casa", "junto a la ventana de la cocina",
           "durante las vacaciones de invierno", "en una calle concurrida de la ciudad",
           "debajo de un árbol grande"],
    "it": ["sulla spiaggia al tramonto", "davanti alla casa", "accanto alla finestra della "
           "cucina", "durante le vacanze invernali", "in una strada affollata della città",
           "sotto un grande albero"],
    "pt": ["na praia ao pôr do sol", "em frente da casa", "ao lado da janela da cozinha",
           "durante as férias de inverno", "numa rua movimentada da cidade",
           "debaixo de uma árvore grande"],
    "nl": ["op het strand bij zonsondergang", "voor het huis", "naast het keukenraam",
           "tijdens de wintervakantie", "in een drukke straat van de stad",
           "onder een grote boom"],
}  # fmt: skip


def captions() -> list[tuple[str, str, str]]:
    """(language, kind, caption): every subject with every scene, and each subject alone."""
    found = []
    for lang, subjects in SUBJECTS.items():
        for subject in subjects:
            found.append((lang, "short", subject))
            found += [(lang, "full", f"{subject} {scene}") for scene in SCENES[lang]]
    return found


def measure(low: bool) -> None:
    from importlib.metadata import version

    import lingua

    builder = lingua.LanguageDetectorBuilder.from_all_languages()
    detector = (builder.with_low_accuracy_mode() if low else builder).build()
    rows = captions()
    texts = [t for _, _, t in rows]
    detector.detect_languages_in_parallel_of(texts)  # loads the models
    began = time.perf_counter()
    found = [detector.detect_language_of(t) for t in texts]
    seconds = time.perf_counter() - began
    codes = [None if f is None else f.iso_code_639_1.name.lower() for f in found]
    mode = "low" if low else "high"
    print(f"lingua-language-detector {version('lingua-language-detector')}, {mode} accuracy, "
          f"all {len(lingua.Language.all())} languages")  # fmt: skip
    for kind in ("full", "short", "all"):
        picked = [(r, c) for r, c in zip(rows, codes, strict=True) if kind in ("all", r[1])]
        right = sum(r[0] == c for r, c in picked)
        print(f"  {kind:5} {right}/{len(picked)} = {right / len(picked):.1%}")
    for lang in SUBJECTS:
        picked = [(r, c) for r, c in zip(rows, codes, strict=True) if r[0] == lang]
        wrong = [f"{r[2]!r}->{c}" for r, c in picked if r[0] != c]
        print(f"  {lang}: {len(picked) - len(wrong)}/{len(picked)}  {'; '.join(wrong)}")
    print(f"  {seconds / len(texts) * 1e6:.0f} µs per caption (one thread)")


if __name__ == "__main__":
    measure(low=False)
    measure(low=True)
