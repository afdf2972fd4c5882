"""Detail categories and the word lists the detectors read.

Each category names one kind of specific a rich caption carries and a casual prompt
leaves out. A word list gives its words *features* (upper-case names); the detectors'
grammar (detect.py) is written over features, not words, so a list can grow without
touching a rule. One word may carry several features ("light" is a colour shade and a
light source); the rule around it decides which reading a phrase takes.

Function-word features (DET, PREP, VERB, ...) stop noun-phrase chunks; content features
(COLOUR, LIGHTN, MAT, ...) mark category words. A word capitalised mid-sentence is read
as part of a name and keeps only its function features ("Blue Glow Globe flower").
"""

from __future__ import annotations

CATEGORIES: tuple[str, ...] = (
    "lighting",  # light sources, quality, direction, shadows, time of day
    "texture",  # surface texture, finish and material
    "layout",  # positions in the frame, arrangement, framing and composition
    "colour",  # colour words and colour phrases
    "count",  # numbers and quantity words
    "background",  # background, backdrop and setting
    "style",  # medium and art style
    "camera",  # shot type, angle, lens, focus
    "mood",  # mood and atmosphere
    "text",  # rendered text: quoted strings, "the word X", "a sign that reads ..."
)

# Steps that come after every detail category, in this order: drop the sentences other
# than the subject's, then trim the subject's sentence to its main clause.
STRUCTURAL: tuple[str, ...] = ("sentence", "clause")

LEXICON: dict[str, set[str]] = {}


def _add(feature: str, words: str) -> None:
    for w in words.split():
        LEXICON.setdefault(w, set()).add(feature)


# ---------------------------------------------------------------------------------------
# Function words: they bound phrases
# ---------------------------------------------------------------------------------------

_add("ART", "a an the")
_add("DET", "a an the this these those its their his her my our your each every another "
            "some any no")
_add("PREP", "in on at under over above below beneath behind beside besides near by with "
             "without from to into onto of against across along around through between among "
             "toward towards inside outside within throughout atop upon during after before "
             "for like past beyond via amid amidst underneath alongside up down off out "
             "about except than per as away")
_add("CONJ", "and or but nor yet &")
_add("SUB", "while whereas although though because since unless if whilst")
_add("REL", "that which who whom whose where when")
_add("COP", "is are was were be been being 's am")
_add("SEEM", "appears appear appeared seems seem seemed looks look looked feels feel felt "
             "remains remain becomes become")
_add("AUX", "can could may might will would should must do does did has have had")
_add("PRON", "it they he she we you i them him us itself themselves there's it's "
             "everything something nothing everyone someone anything")
_add("THERE", "there")
_add("NEG", "not never")
_add("TO", "to")
# Finite verbs common in captions. Only forms that are rarely nouns: a word that is both
# ("faces", "lines") is left to the chunker as a noun.
_add("VERB", "sits sit sat stands stand stood lies lie lay rests rest hangs hang hung shows show "
             "showing depicts depict captures capture reveals reveal contains contain holds hold "
             "held wears wear leads lead runs run extends extend fills fill rises rise grows grow "
             "flows flow casts cast reflects reflect shines shine glows floats float flies fly "
             "walks walk plays perches perch leans lean stretches stretch surrounds surround dominates "
             "dominate occupies occupy takes take gives give creates create provides provide makes "
             "make includes include gazes gaze stares stare looms loom peeks sprawls hovers hover "
             "swims swim crawls climbs climb jumps jump dances dance reads says spells spell "
             "lights illuminates illuminate bathes tints tint comes come goes go seen sees see "
             "consists consist connects connect meets meet covers appear continues continue "
             "overlooks overlook sways hides hide protrudes protrude carries carry "
             "displays features depicted shown dangles drapes drape juts jut "
             "descends descend ascends ascend sprouts emerges emerge sticks stick stays stay "
             "waits wait smiles sleeps sleep eats eat drinks drink looks reaches reach tilts "
             "leaning standing sitting lying resting hanging fall falls")

FUNCTION_FEATURES = frozenset({"ART", "DET", "PREP", "CONJ", "SUB", "REL", "COP", "SEEM",
                               "AUX", "PRON", "THERE", "NEG", "TO", "VERB", "LINKER"})

# Plain adjectives: they never head a noun phrase before a comma ("A broad, pale shelf").
# Words of the category lists below that modify nouns get ADJ too (ADJ_FEATURES).
_add("ADJ", "big small large little tiny huge tall short long wide narrow thick thin broad old "
            "new young ancient modern antique empty full round flat high low deep shallow heavy "
            "clean dirty open closed dry hot fresh ripe rotten broken damaged giant massive "
            "enormous miniature medium-sized mid-sized elderly ornate simple fancy decorative "
            "blunt curved straight twisted bent rectangular circular oval triangular "
            "cylindrical spherical vertical horizontal diagonal parallel dense sparse distant "
            "nearby double different similar identical main inner outer entire whole "
            "partial pointed pointy hollow tiny slender skinny chubby fat lean bald "
            "curly lush bare dead alive wild tame famous ordinary unusual strange odd "
            "distinctive prominent visible invisible partial faint clear wooden")
ADJ_FEATURES = frozenset({"COLOUR", "HUE", "TEXA", "MOODA", "LIGHTA", "STYLEA", "SETA", "CAMA",
                          "FOCUSA", "POSA", "MEDADJ", "LIT", "WEATHER"})

_add("ADV", "all very quite slightly somewhat rather fairly so too almost nearly mostly partly "
            "also just only even still really extremely highly deeply richly softly gently "
            "barely mainly largely entirely completely fully partially relatively "
            "incredibly especially particularly predominantly primarily roughly "
            "approximately about perhaps possibly probably maybe seemingly")

# ---------------------------------------------------------------------------------------
# count: numbers and quantity words
# ---------------------------------------------------------------------------------------

_add("NUM", "two three four five six seven eight nine ten eleven twelve thirteen fourteen "
            "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty "
            "hundred")
_add("ONE", "one")
_add("SINGLE", "single lone solitary")
# "a pair of shoes": the count is the quantity noun and its "of"; the head is "shoes".
_add("QTY", "pair pairs couple trio quartet handful dozen dozens hundreds thousands scores "
            "lots lot bunch group groups crowd herd flock swarm number multitude plethora "
            "myriad array collection")
_add("QDET", "several many multiple numerous countless few various")
IRREGULAR_PLURALS = frozenset("people men women children feet teeth mice geese sheep fish "
                              "deer cattle police oxen dice".split())

# ---------------------------------------------------------------------------------------
# colour
# ---------------------------------------------------------------------------------------

_add("COLOUR", "red orange yellow green blue purple pink brown white black grey gray "
               "violet indigo magenta cyan turquoise teal aqua navy maroon burgundy crimson "
               "scarlet beige tan cream ivory khaki olive lime mint lavender lilac "
               "peach salmon coral gold golden silver bronze copper amber ochre ocher "
               "sienna umber charcoal slate azure cerulean cobalt emerald jade sapphire "
               "ruby fuchsia mauve plum rust rusty taupe sepia off-white offwhite "
               "blonde blond auburn chestnut ebony jet-black snow-white bluish greenish "
               "reddish yellowish brownish pinkish purplish greyish grayish orangish "
               "orangey whitish blackish tawny sandy rosy ruddy chartreuse vermilion "
               "cyan multicolored multicoloured colorful colourful rainbow "
               "monochromatic pastel neon")
_add("HUE", "light dark pale bright deep vivid muted soft pastel neon rich dull dusty faded "
            "hot baby royal navy dusky darker lighter paler brighter deeper warm cool "
            "vibrant saturated desaturated brilliant")
_add("COLOURN", "color colour colors colours hue hues shade shades tone tones tint tints "
                "palette coloring colouring")

# ---------------------------------------------------------------------------------------
# lighting
# ---------------------------------------------------------------------------------------

_add("LIGHTN", "light lighting sunlight daylight moonlight lamplight candlelight firelight "
               "starlight torchlight backlight backlighting glow glows shadow shadows "
               "illumination sunshine sunbeams sunbeam rays beams glare spotlight "
               "spotlights highlights highlight silhouette silhouettes reflections "
               "shade lightning sunrays luminance radiance brightness darkness lights "
               "streetlight streetlights floodlight floodlights haze mist fog")
_add("LIGHTA", "soft harsh warm cool cold diffused diffuse dim bright golden natural "
               "artificial dramatic ambient even strong gentle hazy morning evening "
               "afternoon midday sunset sunrise dusk dawn twilight studio neon fluorescent "
               "direct indirect dappled filtered backlit sunlit moonlit candlelit "
               "dimly-lit well-lit brightly-lit low-key high-key rim volumetric "
               "golden-hour blue-hour overhead low faint intense flat mottled glowing "
               "sunny overcast cloudy foggy misty rainy stormy gloomy shadowy shady "
               "shadowed shaded dark darkened bright-lit poorly-lit unlit lit "
               "cinematic moody")
LEXICON["glowing"].discard("LIGHTA")
_add("LIT", "lit illuminated backlit sunlit moonlit candlelit bathed glowing shadowed "
            "shaded silhouetted lighted shining gleaming glistening glittering sparkling "
            "shimmering highlighted darkened")
_add("TIMEDAY", "morning afternoon evening night dusk dawn sunset sunrise twilight midday "
                "noon nighttime daytime day hour golden-hour nightfall daybreak")
_add("WEATHER", "sunny overcast cloudy foggy misty rainy stormy snowy hazy clear bright "
                "gloomy grey gray cloudless")

# ---------------------------------------------------------------------------------------
# texture and material
# ---------------------------------------------------------------------------------------

_add("TEXA", "rough smooth glossy matte matt shiny fuzzy furry fluffy velvety silky rusty "
             "rusted weathered worn polished brushed woven knitted knit textured bumpy "
             "rugged coarse crinkled wrinkled crumpled cracked peeling chipped corrugated "
             "ribbed quilted embroidered sequined mottled speckled striped dotted spotted "
             "checkered checkerboard plaid patterned glazed lacquered varnished frosted "
             "translucent transparent reflective iridescent sparkly glittery metallic wet "
             "muddy mossy hairy leathery satin spiky prickly scaly feathery downy porous "
             "gritty pebbled stucco tiled wooden woolen woollen polka-dot plain solid "
             "grainy fibrous crumbly flaky crusty creamy sticky slimy slick sleek "
             "gleaming burnished tarnished distressed weather-beaten chrome-plated "
             "wood-grain brushed-metal rippled wavy jagged craggy pitted dimpled "
             "knobbly gnarled grooved ridged fringed frayed tattered threadbare "
             "fluted faceted mirrored stained painted unpainted bare "
             "wicker rattan lacy sheer opaque crystalline marbled veined "
             "stitched padded cushioned soft-textured pockmarked")
_add("MAT", "wood metal stone glass plastic ceramic marble concrete brick leather fabric "
            "cotton silk wool velvet denim linen paper cardboard steel iron brass bronze "
            "copper chrome porcelain clay wicker straw rubber granite stucco cement "
            "sandstone limestone terracotta tin aluminum aluminium wrought-iron cast-iron "
            "felt lace suede fur bamboo rattan cobblestone slate oak pine mahogany walnut "
            "timber plywood resin acrylic vinyl nylon canvas burlap tweed corduroy "
            "crystal gold silver stainless-steel wooden metallic")
_add("TEXN", "texture textures finish sheen surface grain pattern patterns weave patina "
             "gloss coating fill stripes dots spots polka-dots speckles checks lustre "
             "luster shine grooves ridges ripples")

# ---------------------------------------------------------------------------------------
# layout: position, arrangement, framing
# ---------------------------------------------------------------------------------------

_add("POSN", "left right center centre middle top bottom corner corners side sides edge "
             "edges foreground midground middleground front back rear half third thirds "
             "quarter distance periphery border forefront top-left top-right bottom-left "
             "bottom-right upper-left upper-right lower-left lower-right far-left far-right "
             "left-hand right-hand end ends")
_add("POSA", "left right upper lower top bottom far central middle center centre rear "
             "front near top-left top-right bottom-left bottom-right upper-left upper-right "
             "lower-left lower-right left-hand right-hand far-left far-right topmost "
             "bottommost leftmost rightmost uppermost lowermost extreme")
_add("FRAMEN", "frame image picture photo photograph composition shot scene canvas view "
               "photo's image's")
_add("ARRN", "row rows column columns grid line circle semicircle cluster pile stack "
             "arrangement formation pyramid diagonal spiral heap cascade sequence")
_add("ARRV", "arranged lined stacked scattered placed positioned centered centred aligned "
             "spread piled grouped clustered spaced arrayed strewn laid dotted lined "
             "organized organised gathered nestled tucked")
_add("LAYADV", "vertically horizontally diagonally symmetrically asymmetrically "
               "side-by-side off-center off-centre upside-down sideways")

# ---------------------------------------------------------------------------------------
# background and setting
# ---------------------------------------------------------------------------------------

_add("BGN", "background backdrop backgrounds backdrops setting surroundings scenery "
            "environment")
_add("PLACE", "beach forest woods park street streets city cityscape room kitchen field "
              "fields meadow studio desert lake river ocean sea seaside garden yard "
              "backyard road sidewalk alley market cafe café restaurant office bedroom "
              "library shop store stage warehouse countryside village town courtyard "
              "playground harbor harbour dock jungle valley cave interior snow mountains "
              "hills hillside lawn pasture farm barn church museum gallery station airport "
              "classroom hallway corridor bathroom plaza trail path pond shore coast "
              "riverbank suburb neighborhood neighbourhood downtown rooftop balcony porch "
              "patio garage factory workshop laboratory arena stadium tundra savanna swamp "
              "marsh reef grassland orchard vineyard cemetery temple ruins waterfront "
              "boardwalk pier marina island islands canyon cliffs cliff grove clearing "
              "prairie wilderness landscape mountainside seashore lakeside roadside "
              "parking lot highway avenue intersection subway train bus car-park mall "
              "supermarket bar pub diner bakery living dining meadowland hall lobby "
              "auditorium theater theatre gym attic basement cellar greenhouse nursery "
              "farmland ranch campsite campground beachfront sand water waves underwater "
              "snowfield glacier volcano space galaxy")
_add("BGOBJ", "sky skies wall walls backdrop curtain curtains horizon landscape scenery "
              "skyline mountains hills sea ocean field meadow treeline trees forest "
              "clouds water lake bokeh blur backgrounds background")
_add("ARCH", "wall walls floor floors ceiling window windows floorboards carpet rug tiles "
             "wallpaper door doorway shelves")
_add("SETA", "outdoor indoor outdoors indoors outside urban rural suburban underwater "
             "exterior interior open-air alfresco")

# ---------------------------------------------------------------------------------------
# style and medium
# ---------------------------------------------------------------------------------------

_add("MEDIUM", "painting paintings watercolor watercolour watercolors watercolours "
               "illustration illustrations drawing drawings sketch sketches photograph "
               "photographs photo photos photography render rendering renders artwork "
               "art cartoon cartoons anime manga comic comics poster print prints "
               "engraving woodcut linocut etching lithograph collage mosaic fresco graphic "
               "graphics doodle caricature infographic screenshot portrait portraits "
               "still-life painting oil-painting canvas vector pastel pastels gouache "
               "charcoal lithography cgi 3d-render animation claymation diorama "
               "storyboard cel picture image")
_add("MEDADJ", "oil watercolor watercolour acrylic pencil colored-pencil coloured-pencil "
               "charcoal ink pastel gouache digital vector pixel pixel-art flat 3d 3D cgi "
               "line concept pop fine abstract vintage retro hand-drawn hand-painted "
               "cartoon anime comic photographic black-and-white sepia monochrome film "
               "analog analogue polaroid isometric low-poly minimalist minimalistic "
               "realistic photorealistic photo-realistic hyperrealistic hyper-realistic "
               "impressionist impressionistic expressionist cubist surreal surrealist "
               "art-deco art-nouveau baroque renaissance steampunk cyberpunk vaporwave "
               "synthwave ukiyo-e naive folk botanical editorial stylized stylised "
               "painterly sketchy cartoonish cartoony 8-bit 16-bit lo-fi glitch "
               "psychedelic kawaii chibi stop-motion papercut paper-cut cel-shaded toon "
               "comic-book storybook bold-outlined thick-outlined flat-style "
               "cartoon-style anime-style clean artistic art fantasy sci-fi "
               "high-resolution hd 4k 8k ultra-detailed highly-detailed detailed "
               "award-winning professional amateur studio stock grayscale greyscale "
               "tonal graphic gothic medieval victorian art-style")
_add("STYLEA", "photorealistic photo-realistic hyperrealistic hyper-realistic realistic "
               "impressionist impressionistic expressionist cubist surreal surrealist "
               "minimalist minimalistic vintage retro stylized stylised painterly "
               "cartoonish cartoony artistic hand-drawn hand-painted black-and-white "
               "sepia monochrome isometric low-poly pixelated art-deco art-nouveau "
               "baroque steampunk cyberpunk kawaii cel-shaded anime-style cartoon-style "
               "flat-style 8-bit 16-bit lo-fi grayscale greyscale")
_add("STYLEN", "style styles aesthetic manner")

# ---------------------------------------------------------------------------------------
# camera and lens
# ---------------------------------------------------------------------------------------

_add("SHOTN", "bird's-eye-view bird’s-eye-view birds-eye-view shot shots view views close-up closeup "
              "close-ups closeups angle angles "
              "perspective snapshot selfie macro panorama vantage viewpoint framing "
              "photo photograph picture image capture")
_add("CAMA", "close-up closeup extreme wide medium full long low-angle high-angle "
             "eye-level overhead aerial bird's-eye birds-eye bird’s-eye top-down "
             "worm's-eye worm’s-eye side frontal macro wide-angle telephoto panoramic "
             "candid tight establishing over-the-shoulder point-of-view pov dutch tilted "
             "handheld low high straight-on head-on three-quarter cropped zoomed-in "
             "zoomed-out upward downward angled ground-level street-level fisheye "
             "fish-eye long-exposure tilt-shift")
_add("FOCUSA", "blurred blurry out-of-focus in-focus focused unfocused defocused "
               "soft-focus motion-blurred grainy overexposed underexposed long-exposure "
               "tilt-shift fisheye fish-eye hdr vignetted bokeh sharp crisp hazy "
               "pixelated")
_add("CAMN", "lens lenses camera cameras aperture focus bokeh exposure shutter iso dslr "
             "mm f-stop focal telephoto fisheye tripod drone zoom film depth field "
             "mirrorless smartphone iphone")
_add("BRAND", "canon nikon sony leica fujifilm fuji hasselblad pentax olympus panasonic "
              "kodak polaroid gopro iphone pixel")

# ---------------------------------------------------------------------------------------
# mood and atmosphere
# ---------------------------------------------------------------------------------------

_add("MOODA", "serene peaceful calm tranquil cozy cosy moody eerie mysterious melancholic "
              "melancholy nostalgic whimsical playful cheerful joyful joyous gloomy somber "
              "sombre ominous romantic dreamy dreamlike ethereal idyllic festive lively "
              "energetic chaotic quiet lonely desolate haunting inviting welcoming tense "
              "magical enchanting majestic epic intimate relaxed relaxing solemn bleak "
              "uplifting charming quaint picturesque atmospheric beautiful stunning "
              "gorgeous lovely pleasant foreboding sad spooky creepy sinister hopeful "
              "triumphant contemplative pensive wistful grim dramatic bustling hectic "
              "calming soothing harmonious mystical otherworldly heartwarming homey "
              "homely unsettling breathtaking awe-inspiring poignant timeless still "
              "silent meditative restful vibrant striking evocative haunting forlorn "
              "tranquilizing cheery sunny joyless menacing brooding moody airy "
              "light-hearted lighthearted carefree gentle warm cool")
_add("MOODN", "mood moods atmosphere ambiance ambience feel feeling vibe vibes aura air "
              "sense tone emotion spirit serenity tranquility tranquillity calmness peace "
              "nostalgia melancholy mystery warmth charm whimsy tension solitude "
              "loneliness calm stillness quietness coziness cosiness")
_add("MOODV", "creating evoking giving lending adding conveying suggesting imbuing exuding "
              "radiating creates evokes gives lends adds conveys suggests exudes radiates "
              "capturing captures enhancing enhances evoke create give lend add convey "
              "suggest exude radiate instilling instills")

# ---------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------

_add("TEXTN", "word words text phrase name letters letter inscription slogan caption "
              "title label number numbers lettering writing message sign-text logo "
              "characters numerals message")
_add("TEXTV", "reads read reading says say saying spells spell spelling displays display "
              "displaying shows showing labeled labelled titled entitled named called "
              "marked bearing bears printed inscribed stamped written painted")

# ---------------------------------------------------------------------------------------
# Frames: "A <...> shot of", "A watercolor painting of": the noun that heads the frame
# and the words that link the frame to the subject.
# ---------------------------------------------------------------------------------------

_add("LINKER", "takes showcases showcasing of shows showing depicts depicting captures capturing features featuring "
               "reveals revealing presents presenting displays displaying highlights "
               "focuses portrays portraying illustrates illustrating")

# Irregular past participles: they read like "-ed" words ("a shot taken from above").
_add("ED", "taken seen drawn done made shown grown worn hung built held sewn thrown woven hewn "
           "given known broken fallen frozen spun cast set")

# Words the rules name literally (detect.py, `<@word>`) that no list above holds.
_add("KW", "afar balanced built captured carved casting coated colored coloured coming composed "
           "constructed consumes covered crafted created divided done drawn dyed effect evenly "
           "executed eye fashioned filling filmed finished formed framed ground heavy height hewn "
           "illustrated layout level located made narrow next occupying other perfect "
           "photographed pictured piece point producing random ranging rendered sculpted "
           "selective set shallow situated split styled symmetrical taken taking throwing "
           "tinted touch trending using viewed washed work spans")
# Stand-ins for word shapes the tagger recognises (tokens.py): lens figures ("35mm",
# "f/1.8", "1/250s", "ISO100") and colour compounds ("purple-blue", "ivory-colored").
_add("LENSNUM", "<lensnum>")
_add("COLOUR", "<colourword>")

# Nouns that head a phrase but name an amount or a container of the real subject.
CONTAINER_NOUNS = frozenset("cup glass bowl plate slice piece suit bottle jar box basket "
                            "bag bouquet bunch sheet loaf bar can pot vase".split())

# -ing words that are nouns ("a building with ..."); they do not end a noun phrase.
ING_NOUNS = frozenset(
    "building buildings ceiling ceilings painting paintings clothing ring rings string strings "
    "wing wings king thing things something nothing morning evening railing railings siding "
    "awning awnings lighting bedding frosting icing pudding stuffing dumpling sibling earring "
    "earrings lettering molding moulding paneling flooring housing wedding landing opening "
    "openings crossing parking spring swing swings stocking stockings offering drawing "
    "drawings sketching bedding carving carvings setting settings coating filling "
    "background ending ending fencing plumbing topping toppings seating sibling "
    "ceiling cladding netting piping scaffolding shading tiling framing evening "
    "outing shavings clipping clippings savings markings marking wiring lining".split())
ED_NOUNS = frozenset("bed red shed sled seed speed reed weed flowerbed hundred riverbed "
                     "seabed sunbed hotbed seaweed tweed steed creed breed".split())
LY_NOT_ADV = frozenset("family fly belly jelly holly lily bully italy july rally ally reply "
                       "supply apply only early lonely friendly lovely chilly curly hilly "
                       "woolly ugly silly elderly likely daily weekly monthly yearly "
                       "butterfly dragonfly firefly assembly anomaly homely melancholy "
                       "sly ply comely jolly".split())
ABBREVIATIONS = frozenset("mr mrs ms dr st vs e.g i.e approx no jr sr inc ltd co mt ft "
                          "fig vol ca".split())
