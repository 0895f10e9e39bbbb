"""Printed letters and symbols that look like no digit, and the fonts to print them with.

Three disjoint sets of fonts, so that rejection is measured on what the model was not trained on:
- training: DejaVu Sans and DejaVu Serif (every weight, slant and width), letters, TRAIN_SYMBOLS and
  BROAD_SYMBOLS (BROAD_HELD_OUT, in the DejaVu training faces, is never trained on: recipes are chosen
  with it). GNU FreeFont as more training fonts was measured and left out (docs/training.md);
- selection: Liberation (Sans, Sans Narrow, Serif, Mono), never trained on nor measured with: letters
  and BROAD_HELD_OUT in it tell recipes apart on a font no model has seen;
- measuring: DejaVu Sans Mono, DejaVu Math TeX Gyre and Pillow's built-in font (Aileron), the same
  letters and EVAL_SYMBOLS (no symbol is in both lists).

Letters and symbols that can pass for a digit are left out of both: O o D Q ° are zeros, I l i j | / !
ones (with t ↑ ↓ ⊥), Z z twos, S s $ § fives, G b sixes, T sevens, B & eights, g q nines, ξ ∃ threes,
φ ⊕ ⊗ zeros or eights. Asking the model to reject those would teach it to reject real digits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Latin letters minus the digit look-alikes listed above.
UPPER = "ACEFHKLMNPRUVWXY"
LOWER = "acdefhkmnpruvwxy"
GREEK = "ΓΔΛΞΠΣΨΩαγεηλμπψω"
TRAIN_SYMBOLS = ("#%@*+=~<>^×÷±≠≈∑∏∆←→↔★♥♣☺✓∀∈∪⌂"
                 # Added for model 2.1.0: arrows, set and logic signs, boxes, pictographs, Cyrillic capitals.
                 "↖↗↘↙⇔∠⊂⊃⊆⊇∧∨∼⊢⊣⋈⊞⊟⊠△□■▲▼☐☑☒✈☂☎✉✂❄⌘⌥⚠‰«»‹›⁂※₩ЖШЩЮЯИЙЦЛ")
EVAL_SYMBOLS = "¶©®™€£¥¤⇒⇐☆♦♠☼✗✚✱∇∩≡≤≥√∝№"
BROAD_SYMBOLS = (
                 "¨ª«¬¯µ»¿ĀāĂăĄąĆćĈĉĊċČčďđĒēĔĕĖėĘęĚěĤĥĦħĲĳĶķĸĹĻĽĿŁŃńŅņŇňŉŒ"
                 "œŔŕŖŗŘřũūŭůűŲŴŵŶŷŸƇƈƏƑƔƘƙƜƝƢƣƤƥƦƩƯưƲƳƴƸƹǆǇǈǉǊǋǌǍǎǔǕǖǗǘǙǚ"
                 "ǛǜǝǞǟǠǡǢǣǨǩǮǯǱǳǶǷǸǹǺǻǼǽȀȁȂȃȄȅȆȇȐȑȒȓȕȗȞȟȢȣȦȧȨȩȲȳȵȸȺȻȼȽɁɂɄ"
                 "ɅɆɇɍɎɏͰͶ;΅ΆΈΉΑΔΗΚΛΜΝΡΣΧΨΩΫάΰαγκλνπσυχψωϋύώϒϓϔϖϗϚϛϜϞϠϡϢϣϦ"
                 "ϧϪϰϲϸϺϻЁЂЉЊЋЌЍЎЏГДЖИЙКЛУЦЩЪЫЬЮгдежийклрстуфхцшъыюяѐёѓћўѠ"
                 "ѡѢѣѥѦѧѨѩѪѫѬѮѯѰѱѶѷѸѹѼѽѾѿ҂ҋҌҍҎҏҐґҒҗҘҙҚқҜҝҞҟҠҡҢңҤҥҦҨҩҬҭҮүұҲ"
                 "ҳҵҺһҿӁӂӄӅӆӇӉӍӎӑӒӓӕӗӘәӚӛӜӞӟӢӣӤӥӫӬӰӱӲӳӶӸӹӺӽԱԲԴԷԸԹԻԽՃՉՊՍՎՐՒ"
                 "Ֆ՜՞՟աեէթլհձղճմնչպսվտրւքև֊בכמעפץרש‐‑–‗“‟‥‰‱″‴‶‷‹›※‼⁁⁂⁈⁉⁐⁑"
                 "⁒⁕⁖⁗⁘₢₣₥₦₨₩₪₫₭₰₱₲₳₵₹₺℀℃℄℆℉ℋℌℍℎℏℐℒ℔ℕ℘ℙℚℛℜℝ℞℟℠℡℣℥ΩKÅℬℭ℮ℰℱℳ"
                 "ℶℷ℻ℼℽℿ⅀⅃⅄ⅅⅆⅇⅈ⅋ⅎ←→↔↖↙↚↛↜↝↞↟↢↣↤↦↧↨↩↬↮↯↱↳↸↹↼↽⇄⇅⇆⇇⇊⇌⇎⇑⇖⇗⇘⇙⇚⇛"
                 "⇝⇞⇠⇡⇢⇣⇥⇧⇩⇪⇫⇬⇮⇱⇲⇳⇵⇶⇷⇸⇹⇻⇼⇽⇿∀∈∉∊∋∌∍∑∓∔∛∜∞∟∠∢∧∪∬∭∯∰∱∲∳∴∶∷∸∹∺"
                 "∾≁≂≃≄≇≈≍≎≏≐≒≓≔≕≖≗≘≙≚≛≜≞≟≠≦≧≨≪≫≭≮≯≰≴≵≶≷≹≺≻≼≽≾≿⊁⊂⊄⊅⊆⊇⊈⊊⊋⊌⊍"
                 "⊎⊏⊑⊒⊓⊟⊠⊡⊢⊣⊤⊦⊧⊨⊩⊪⊫⊭⊮⊯⊰⊱⊲⊴⊵⊶⊷⊸⊹⊻⊼⊽⊾⊿⋀⋃⋆⋇⋋⋌⋍⋎⋏⋑⋓⋕⋗⋛⋜⋝⋞⋟⋡⋢⋣⋤"
                 "⋥⋧⋨⋩⋪⋬⋳⋴⋶⋷⋸⋺⋻⋼⋽⋾⋿⌁⌂⌃⌄⌆⌌⌎⌏⌐⌑⌘⌙⌞⌟⌤⌥⌧⌨⌫⌬⍴⍵⍺⍽⎇⎔⏎⏏⏥⏨■□▣▤▥▦▧▪▫"
                 "▭▯▱△▵▶▹►▻▽▿◀◁◂◃◄◅◇◈◊◣◤◥◩◪◫◬◭◮◰◲◳◸◹◺◻◼◽◾☁☂☃☄★☇☈☊☋☌☍☎☏☐☑☒☓"
                 "☔☕☖☗☘☚☜☝☞☟☠☢☣☥☦☧☨☩☫☬☭☯☰☱☲☳☴☵☶☸☺☿♀♁♃♄♆♇♈♉♋♍♎♏♐♑♒♔♕♖♘♙♚♛♜♝"
                 "♞♟♡♢♤♧♨♪♫♬♭♮♯♰♱♲♳♴♵♶♷♸♹♾⚀⚁⚂⚃⚅⚌⚍⚎⚐⚒⚓⚔⚕⚖⚗⚘⚚⚛⚜⚞⚠⚡⚢⚤⚥⚧⚩⚭⚮⚯⚰⚱"
                 "⚳⚴⚷⚸⛀⛁⛂⛃✁✃✄✆✈✉✌✎✐✑✒✕✖✙✟✡✥✧✭✯✳✴✵✶✺✿❁❄❅❆❉❋❐❒❝❞❡❣❤❦❭❮➔➘➙➚➝➞"
                 "➠➢➤➥➨➩➪➫➬➭➮➯➱➳➴➵➷➸➹➻➼➾")
"""Added for model 2.3.0: every character of whole Unicode blocks that the training fonts draw, less the
measuring symbols, their look-alikes and digit look-alikes (`python -m training.synth.broad_symbols` chose
them and says what it left out, and why)."""
BROAD_HELD_OUT = (
                  "¢±ƕƺƿǁǄȹͱͲͳͷΎΓΞΥέήβζμρτϊϏϫϮϷЀЃАМНРХШамнщьђљњќѝѤѭѴѵҊғҖҧҰҴ"
                  "ҼҽҾӃӈӊӐӔӖӝӪӭӮӯӷӼӾӿԵԺԼՂՆՔբդժիխփֆאצק”„‸⁇⁙⁛⁜₧₮₯₸℁ℂ℅ℯℲℵℾ↗↘↠↪"
                  "↫↭↲↵⇀⇁⇈⇉⇋⇓⇕⇜⇤⇭⇯⇰⇺⇾∁∆∡∵∿≉≑≣≩≱≸⊀⊃⊉⊐⊔⊞⊬⊳⋁⋈⋉⋊⋐⋔⋖⋘⋙⋚⋠⋦⋭⋲⋵⋹⌀⌅⌦"
                  "▨▩▬▰▷▸◧◨◱◿☉☛☤☪☮☷☻☽☾♂♅♊♌♓♗♺♼♽♿⚄⚏⚙⚟⚣⚦⚵⚶⛢✂✇✍✏✝✞✠✫✮✷❀❈❊❏❑➛➟➣"
                  "➦➶➺➽")
"""The fifth of the broad candidates held out of training: symbols in the training fonts that no model
trains on, to choose between recipes with (negatives.SELECTION_KINDS), never the measuring kinds."""
LETTERS = UPPER + LOWER

FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))
# File-name prefixes of the font sets (Debian: fonts-dejavu-core and -extra, fonts-liberation).
DEJAVU_TRAIN_PREFIXES = ("DejaVuSans-", "DejaVuSans.", "DejaVuSansCondensed", "DejaVuSerif")
TRAIN_FONT_PREFIXES = DEJAVU_TRAIN_PREFIXES
SELECTION_FONT_PREFIXES = ("Liberation",)
EVAL_FONT_PREFIXES = ("DejaVuSansMono", "DejaVuMathTeXGyre")
BUILTIN = "pillow-builtin"
"""Pillow's own scalable font (`ImageFont.load_default(size=...)`), available wherever Pillow is."""


@dataclass(frozen=True)
class FontSet:
    """Font files (or BUILTIN) of one half, with the characters each of them can draw."""

    fonts: tuple[str, ...]
    coverage: dict[str, str]

    def describe(self) -> str:
        """Font names for reports and metadata."""
        return ", ".join(Path(f).stem if f != BUILTIN else BUILTIN for f in self.fonts)


def _font_files() -> list[Path]:
    found: list[Path] = []
    for root in FONT_DIRS:
        if root.is_dir():
            found += sorted(root.rglob("*.ttf"))
    return found


@functools.lru_cache(maxsize=512)
def load_font(font: str, size: int) -> ImageFont.FreeTypeFont:
    """A font file (or BUILTIN) at `size` pixels."""
    if font == BUILTIN:
        loaded = ImageFont.load_default(size=size)
        assert isinstance(loaded, ImageFont.FreeTypeFont)  # Pillow >= 10.1 with FreeType
        return loaded
    return ImageFont.truetype(font, size)


def _drawable(font: str, characters: str) -> str:
    """The characters `font` has a glyph for (a missing one draws the same box as a private-use code)."""
    face = load_font(font, 48)

    def drawn(ch: str) -> bytes:
        page = Image.new("L", (96, 96), 0)
        ImageDraw.Draw(page).text((8, 8), ch, font=face, fill=255)
        return page.tobytes()

    missing = drawn("\ue000")
    return "".join(ch for ch in characters if drawn(ch) != missing)


def _font_set(prefixes: Sequence[str], characters: str, builtin: bool) -> FontSet:
    fonts = [str(p) for p in _font_files() if p.name.startswith(tuple(prefixes))]
    if builtin or not fonts:
        # Without the DejaVu files (a bare container) both halves fall back to Pillow's own font:
        # rejection is then measured on the training font. Reports name the fonts used.
        fonts.append(BUILTIN)
    coverage = {font: _drawable(font, characters) for font in fonts}
    kept = tuple(font for font in fonts if coverage[font])
    return FontSet(fonts=kept, coverage={font: coverage[font] for font in kept})


@functools.cache
def training_fonts() -> FontSet:
    """Fonts and characters that training negatives are printed with."""
    # The held-out symbols are in the coverage too, for the selection kind; each training kind draws from
    # its own characters only (negatives._glyph).
    return _font_set(TRAIN_FONT_PREFIXES, LETTERS + GREEK + TRAIN_SYMBOLS + BROAD_SYMBOLS + BROAD_HELD_OUT,
                     builtin=False)


@functools.cache
def held_symbol_fonts() -> FontSet:
    """The DejaVu training faces, for BROAD_HELD_OUT: the selection kind of symbols never trained on."""
    # Only the DejaVu faces, with their coverage of all the training characters, whatever other fonts a
    # recipe trains on (FreeFont was tried): recipes of either font set are compared on the same images.
    trained = training_fonts()
    kept = tuple(font for font in trained.fonts if Path(font).name.startswith(DEJAVU_TRAIN_PREFIXES)) or trained.fonts
    return FontSet(fonts=kept, coverage={font: trained.coverage[font] for font in kept})


@functools.cache
def selection_fonts() -> FontSet:
    """Fonts neither trained on nor measured with, for choosing between recipes (Liberation)."""
    return _font_set(SELECTION_FONT_PREFIXES, LETTERS + BROAD_HELD_OUT, builtin=False)


@functools.cache
def eval_fonts() -> FontSet:
    """Fonts and characters kept for measuring: none of them is trained on (fonts fall back, see above)."""
    return _font_set(EVAL_FONT_PREFIXES, LETTERS + EVAL_SYMBOLS, builtin=True)


def render_text(text: str, font: str, size: int, rotation: float = 0.0, bold: int = 0) -> Image.Image:
    """`text` in black on a white "L" page with a margin, optionally rotated and thickened."""
    face = load_font(font, size)
    left, top, right, bottom = (int(v) for v in face.getbbox(text, stroke_width=bold))
    margin = size // 3
    page = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin), 255)
    ImageDraw.Draw(page).text((margin - left, margin - top), text, font=face, fill=0, stroke_width=bold,
                              stroke_fill=0)
    if rotation:
        page = page.rotate(rotation, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=255)
    return page
