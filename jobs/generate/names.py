"""Small embedded Québec name, street and place lists (no external dependency).

Every string here must be encodable in latin-1: one establishment writes its
extracts in that charset (so no ``œ``, no typographic apostrophe).
"""

from __future__ import annotations

FAMILY_NAMES = (
    "Tremblay", "Gagnon", "Roy", "Côté", "Bouchard", "Gauthier", "Morin", "Lavoie", "Fortin",
    "Gagné", "Ouellet", "Pelletier", "Bélanger", "Lévesque", "Bergeron", "Leblanc", "Paquette",
    "Girard", "Simard", "Boucher", "Caron", "Beaulieu", "Cloutier", "Dubé", "Poirier", "Fournier",
    "Lapointe", "Leclerc", "Lefebvre", "Poulin", "Thibault", "St-Pierre", "Nadeau", "Martin",
    "Landry", "Martel", "Bédard", "Grenier", "Lessard", "Bernier", "Richard", "Michaud", "Hébert",
    "Desjardins", "Couture", "Turcotte", "Lachance", "Parent", "Blais", "Gosselin", "Savard",
    "Proulx", "Beaudoin", "Demers", "Perreault", "Boudreau", "Lemieux", "Cyr", "Perron", "Dufour",
    "Dion", "Mercier", "Bolduc", "Bérubé", "Boivin", "Langlois", "Ménard", "Labbé", "Brassard",
    "Émond", "Séguin", "Deschênes", "Gingras", "Champagne", "Chénier", "Vézina", "Légaré",
    "Beauchemin", "Laflamme", "Fréchette", "Brisebois", "Ng", "Li", "Nguyen", "Haddad", "Khoury",
    "Joseph", "Pierre-Louis", "Diallo", "Benali", "Da Silva", "O'Brien", "MacDonald", "Gagnon-Roy",
    "Côté-Lévesque", "Bouchard-Simard", "D'Amours", "Després", "Larivière", "Thériault", "Brûlé",
)

GIVEN_NAMES_FEMALE = (
    "Marie", "Julie", "Nathalie", "Isabelle", "Sophie", "Catherine", "Chantal", "Sylvie", "Josée",
    "Lyne", "Mélanie", "Geneviève", "Émilie", "Camille", "Léa", "Chloé", "Florence", "Charlotte",
    "Rosalie", "Béatrice", "Zoé", "Alice", "Juliette", "Élodie", "Maëlle", "Noémie", "Andréanne",
    "Marie-Ève", "Marie-Pier", "Anne-Sophie", "Marie-Josée", "Hélène", "Françoise", "Thérèse",
    "Céline", "Ginette", "Louise", "Monique", "Jocelyne", "Gisèle", "Danielle", "Valérie",
    "Stéphanie", "Amélie", "Mégane", "Océane", "Éloïse", "Laurence", "Ève", "Aïcha",
)

GIVEN_NAMES_MALE = (
    "Jean", "Pierre", "Michel", "André", "François", "Luc", "Alain", "Stéphane", "Martin", "Sylvain",
    "Éric", "Patrick", "Daniel", "Mathieu", "Guillaume", "Maxime", "Olivier", "Alexandre",
    "Samuel", "Gabriel", "Félix", "Thomas", "William", "Louis", "Édouard", "Noah", "Liam", "Léo",
    "Jacob", "Émile", "Raphaël", "Benoît", "Jérôme", "Sébastien", "Frédéric", "Réjean", "Gaétan",
    "Gérard", "Marcel", "Gilles", "Normand", "Yves", "Denis", "Jean-François", "Jean-Philippe",
    "Pierre-Luc", "Marc-André", "Jean-Sébastien", "Hugo", "Anaël",
)

STREET_NAMES = (
    "rue Sainte-Catherine", "rue Saint-Denis", "boulevard René-Lévesque", "rue Sherbrooke",
    "avenue du Parc", "rue Notre-Dame", "chemin de la Côte-des-Neiges", "boulevard Saint-Laurent",
    "rue Principale", "rue de l'Église", "rue des Érables", "avenue des Pins", "rue du Moulin",
    "boulevard Labelle", "rue Saint-Georges", "chemin du Lac", "rue des Bouleaux", "rue Racine",
    "boulevard des Laurentides", "rue Papineau", "rue Frontenac", "avenue Cartier",
    "rue de la Fabrique", "rue Champlain", "boulevard Talbot", "rue Maisonneuve", "rue Laval",
    "rue du Ruisseau", "montée Sainte-Thérèse", "rang Saint-Joseph", "route 117",
    "rue Jean-Talon", "rue Saint-Jean", "rue des Outardes", "rue de la Rivière", "avenue Bélanger",
)

# City and the forward sortation areas (first three characters of the postal
# code) that serve it; the first letter gives the region (G, H, J in Québec).
CITIES = (
    ("Montréal", ("H1A", "H1E", "H1N", "H2B", "H2G", "H2J", "H2X", "H3B", "H3H", "H3S", "H4A", "H4C")),
    ("Laval", ("H7A", "H7G", "H7L", "H7N", "H7T")),
    ("Longueuil", ("J4H", "J4J", "J4K", "J4M")),
    ("Québec", ("G1K", "G1L", "G1R", "G1S", "G1V", "G2B")),
    ("Lévis", ("G6V", "G6W", "G6Z")),
    ("Gatineau", ("J8T", "J8Y", "J9A", "J9H")),
    ("Sherbrooke", ("J1E", "J1G", "J1H", "J1J")),
    ("Trois-Rivières", ("G8T", "G8Y", "G9A", "G9B")),
    ("Saint-Jérôme", ("J7Y", "J7Z", "J5L")),
    ("Mont-Tremblant", ("J8E",)),
    ("Sainte-Agathe-des-Monts", ("J8C",)),
    ("Mont-Laurier", ("J9L",)),
    ("Terrebonne", ("J6W", "J6X", "J6Y")),
    ("Blainville", ("J7B", "J7C")),
    ("Rimouski", ("G5L", "G5M", "G5N")),
    ("Rivière-du-Loup", ("G5R",)),
    ("Matane", ("G4W",)),
    ("Baie-Comeau", ("G4Z", "G5C")),
    ("Saguenay", ("G7H", "G7J", "G7S")),
    ("Drummondville", ("J2B", "J2C")),
)

# Letters Canada Post uses in the 2nd and 3rd positions of a unit (no D F I O Q U).
POSTAL_LETTERS = "ABCEGHJKLMNPRSTVWXYZ"

# Québec area codes.
AREA_CODES = ("514", "438", "450", "579", "418", "581", "819", "873")

# Reserved example domains only: synthetic addresses must never reach a real mailbox.
EMAIL_DOMAINS = ("example.com", "example.org", "example.net")

CARE_SITES = {
    "inpatient": ("Médecine interne", "Cardiologie", "Oncologie", "Pneumologie", "Chirurgie générale",
                  "Gériatrie", "Néphrologie", "Soins intensifs"),
    "outpatient": ("Clinique de diabète", "Clinique externe de cardiologie", "Centre de cancérologie",
                   "Clinique de pneumologie", "Clinique de médecine familiale", "Prélèvements"),
    "emergency": ("Urgence", "Urgence - aire ambulatoire", "Urgence - civières"),
}

# Admission notes are free text: they identify (names, ages, relatives) and must
# never leave bronze. Placeholders are filled per encounter.
ADMISSION_NOTES = {
    "inpatient": (
        "{title} {given} {family}, {age} ans, admis{e} pour {reason}. Accompagné{e} de sa fille.",
        "Admission de {title} {family} ({age} ans) pour {reason}, suivi{e} par Dr {doctor}.",
        "{age} ans, {reason} depuis 3 jours, vit seul{e} au {street}. Famille avisée.",
        "Transfert de l'urgence: {reason}. {title} {family} connu{e} pour antécédents, à réévaluer demain.",
    ),
    "emergency": (
        "Consulte pour {reason}. {title} {family}, {age} ans, arrivé{e} en ambulance.",
        "{given} {family} se présente à l'urgence: {reason}, douleur 7/10.",
        "Amené{e} par son conjoint pour {reason}; dernier repas à midi.",
    ),
    "outpatient": (
        "Suivi de routine pour {reason}. {title} {family} ({age} ans).",
        "Rendez-vous de contrôle, {reason}, stable.",
        "",
    ),
}

REASONS = (
    "douleur thoracique", "dyspnée", "fièvre et toux", "chute à domicile", "hyperglycémie",
    "oedème des membres inférieurs", "douleur abdominale", "confusion aiguë",
    "suivi de chimiothérapie", "hypertension mal contrôlée", "palpitations", "insuffisance rénale",
)

DOCTORS = ("Tremblay", "Nguyen", "Gagnon", "Haddad", "Roy", "Bélanger", "Diallo", "Côté")
