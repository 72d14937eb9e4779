"""A seeded, labelled evaluation set for duplicate detection.

True persons from five origin groups (Arabic-script names from Egypt, Sudan,
Libya and Chad; Tigrinya/Amharic names in Ethiopic script; Bengali names;
West African and Filipino names in Latin script only) are registered one to
three times at different sites, the way field teams write them down:
transliteration variants, the original script on some records and Latin on
others, typos, given and family swapped, a father's name added or dropped,
dates missing, year-only or estimated, sex or nationality missing, document
numbers present or not and formatted differently, phones changed.

Hard negatives are built in: very common names carried by many different
people (many Mohamed Alis with other birth dates and documents) and
households whose members share a family name (or their father's name), a
phone and a household group, with different given names and ages (a few
twins share the birth date too).

Every document validates as `RegistrationCreate`; the truth (`true_person`)
is kept beside the document, never in it.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ORIGINS", "Labelled", "Origin", "generate"]

LAST_BIRTH_YEAR = 2024  # keeps every date in the past, whenever the bench runs
SITES = ["ras-jedir", "salloum", "tripoli", "benghazi", "sebha", "zuwara", "misrata", "kufra"]


@dataclass(frozen=True)
class Origin:
    """Names of one origin group: each name is its Latin spellings and original script."""

    nationalities: tuple[str, ...]
    male: tuple[tuple[tuple[str, ...], str | None], ...]
    female: tuple[tuple[tuple[str, ...], str | None], ...]
    family: tuple[tuple[tuple[str, ...], str | None], ...]
    towns: tuple[tuple[str, ...], ...]
    common: tuple[tuple[str, str], ...]  # (given, family) pairs carried by many people
    patronymic: bool  # a child's family name is the father's given name
    weight: float


def _pool(text: str) -> tuple[tuple[tuple[str, ...], str | None], ...]:
    """'Mohamed/Muhammad=محمد, Ahmed/Ahmad' -> ((('Mohamed', 'Muhammad'), 'محمد'), ...)."""
    out = []
    for item in text.split(","):
        latin, _, original = item.strip().partition("=")
        out.append((tuple(latin.split("/")), original or None))
    return tuple(out)


def _towns(text: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(t.split("/")) for t in text.split(", "))


_ARABIC_MALE = _pool(
    "Mohamed/Muhammad/Mohammed/Mohamad=محمد, Ahmed/Ahmad=أحمد, Mahmoud/Mahmud=محمود,"
    "Mostafa/Mustafa/Moustafa=مصطفى, Hassan/Hasan=حسن, Hussein/Hussain/Hussien=حسين,"
    "Ibrahim/Ebrahim=إبراهيم, Youssef/Yousef/Yusuf=يوسف, Omar/Umar=عمر, Ali/Aly=علي,"
    "Khaled/Khalid=خالد, Osman/Othman/Uthman=عثمان, Abdallah/Abdullah=عبد الله,"
    "Abdel Rahman/Abdelrahman/Abdul Rahman/Abd al-Rahman=عبد الرحمن,"
    "Abdel Aziz/Abdelaziz/Abdul Aziz=عبد العزيز, Suleiman/Sulaiman/Soliman=سليمان,"
    "Musa/Moussa/Mousa=موسى, Adam=آدم, Idris/Idriss=إدريس, Yahya/Yehia=يحيى, Salah=صلاح,"
    "Tarek/Tariq/Tarik=طارق, Gamal/Jamal=جمال, Ismail/Ismael/Esmail=إسماعيل,"
    "Mahamat/Mahamad, Abakar/Abbakar, Hamid/Hamed=حامد, Nasser/Naser=ناصر,"
    "Walid/Waleed=وليد, Karim/Kareem=كريم, Bashir/Basheer=بشير, Hisham/Hesham=هشام,"
    "Ayman/Aymen=أيمن, Fathi/Fathy=فتحي, Ramadan/Ramadhan=رمضان, Adel/Adil=عادل,"
    "Nabil/Nabeel=نبيل, Anwar/Anouar=أنور, Magdi/Magdy/Majdi=مجدي, Sami/Samy=سامي,"
    "Hamza/Hamsa=حمزة, Bilal/Belal=بلال, Ashraf/Achraf=أشرف, Emad/Imad=عماد, Hany/Hani=هاني,"
    "Sherif/Sharif=شريف, Tamer/Tamir=تامر, Wael/Wail=وائل, Hatem/Hatim=حاتم, Jaber/Gaber=جابر,"
    "Rashid/Rashed=راشد, Saad=سعد, Faisal/Faysal=فيصل, Fadl/Fadel=فضل, Kamal/Kamel=كمال,"
    "Nour El Din/Noureldin=نور الدين, Younis/Younes/Yunus=يونس, Mutasim/Moatasem=معتصم,"
    "Amir/Ameer=أمير, Shawki/Shawky=شوقي, Fares/Faris=فارس, Jibril/Gibril=جبريل,"
    "Eissa/Issa=عيسى, Siddig/Siddiq=صديق, Mubarak/Moubarak=مبارك, Ezzat/Izzat=عزت"
)
_ARABIC = Origin(
    nationalities=("EGY", "EGY", "SDN", "SDN", "TCD", "LBY"),
    male=_ARABIC_MALE,
    female=_pool(
        "Fatma/Fatima/Fatimah=فاطمة, Aisha/Aicha/Aysha=عائشة, Mariam/Maryam/Mariem=مريم,"
        "Amna/Amina/Aminah=آمنة, Khadija/Khadiga/Khadidja=خديجة, Zeinab/Zainab/Zenaba=زينب,"
        "Hawa/Haoua=حواء, Asmaa/Asma=أسماء, Nour/Noor=نور, Salma/Selma=سلمى, Hanan=حنان,"
        "Samira/Sameera=سميرة, Huda/Hoda=هدى, Rania/Ranya=رانيا, Sara/Sarah=سارة,"
        "Halima/Halimah=حليمة, Mona/Muna=منى, Iman/Eman=إيمان, Hind/Hend=هند, Reem/Rim=ريم,"
        "Dina/Deena=دينا, Nadia/Nadya=نادية, Layla/Leila/Laila=ليلى, Hala=هالة, Rasha=رشا,"
        "Najla/Nagla=نجلاء, Wafaa/Wafa=وفاء, Souad/Suad=سعاد, Nawal=نوال, Safia/Safiya=صفية,"
        "Rahma/Rahmah=رحمة, Habiba/Habibah=حبيبة, Sumaya/Somaya=سمية, Naima/Naeema=نعيمة"
    ),
    family=_ARABIC_MALE
    + _pool(
        "El Sayed/Elsayed/Al-Sayed=السيد, Mansour/Mansur=منصور, Farouk/Farouq=فاروق,"
        "Shahin/Shaheen=شاهين, Babiker/Babikir=بابكر, Ishag/Ishaq/Ishak=إسحاق, Adoum/Adum,"
        "Zakaria/Zakariya=زكريا, Haroun/Harun=هارون, El Tayeb/Eltayeb/Al-Tayeb=الطيب,"
        "Abdelkarim/Abdul Karim=عبد الكريم, Deby/Debi, Oumar/Umar, Brahim/Ibrahim,"
        "Abdelgadir/Abdel Gadir/Abdulqadir=عبد القادر, Yagoub/Yacoub/Yaqub=يعقوب,"
        "Daoud/Dawood/Dawud=داود, Abbas/Abas=عباس, Awad/Awadh=عوض, Hammad/Hamad=حماد,"
        "Khamis/Khamees=خميس, Osama/Usama=أسامة, Nasr/Nassr=نصر, Shaker/Shakir=شاكر,"
        "Tahir/Taher=طاهر, Fadlallah/Fadlalla=فضل الله, Zubair/Zubeir=الزبير"
    ),
    towns=_towns(
        "Assiut/Asyut, Sohag/Suhag, Minya/El Minya, Fayoum/Faiyum, Khartoum/Khartum, "
        "El Fasher/Al Fashir, Nyala, Kassala/Kasala, Omdurman/Umdurman, Abeche/Abéché, "
        "N'Djamena/Ndjamena, Sebha/Sabha"
    ),
    common=(
        ("Mohamed", "Ali"),
        ("Mohamed", "Ahmed"),
        ("Ahmed", "Mohamed"),
        ("Mohamed", "Hassan"),
        ("Mohamed", "Ibrahim"),
        ("Ali", "Mohamed"),
    ),
    patronymic=True,
    weight=0.40,
)
_ETHIOPIC_MALE = _pool(
    "Tesfaye/Tesfay/Tesfai=ተስፋዬ, Yohannes/Yohanes/Johannes=ዮሃንስ, Berhane/Birhane/Brhane=ብርሃነ,"
    "Tsegay/Tsegai/Tsegaye=ጸጋይ, Mehari/Mihari=መሓሪ, Kidane/Kidan=ኪዳነ, Tewelde/Tewolde=ተወልደ,"
    "Haile/Hayle=ሃይለ, Dawit/Dawitt=ዳዊት, Solomon/Selomon=ሰለሞን, Amanuel/Emmanuel=ኣማኑኤል,"
    "Filmon/Philmon=ፍልሞን, Yonas/Jonas=ዮናስ, Habtom/Habtum=ሃብቶም, Mulugeta/Mulegeta=ሙሉጌታ,"
    "Ghirmay/Girmay=ግርማይ, Kibrom/Kbrom=ክብሮም, Mikael/Michael=ሚካኤል, Abraham/Abrham=ኣብርሃም,"
    "Isaias/Isayas=ኢሳያስ, Bereket/Bereket=በረከት, Tekle/Teklay=ተኽለ, Weldu/Woldu=ወልዱ,"
    "Gebremedhin/Ghebremedhin=ገብረመድህን, Gebreyesus/Ghebreyesus=ገብረየሱስ, Asmerom=ኣስመሮም,"
    "Goitom/Guitom=ጎይቶም, Samuel/Samiel=ሳሙኤል, Efrem/Ephrem=ኤፍሬም, Henok/Hanok=ሄኖክ,"
    "Robel/Rubel=ሮቤል, Temesgen/Temesghen=ተመስገን, Alem=ኣለም, Kahsay/Kassay=ካሕሳይ,"
    "Negash/Negassi=ነጋሽ, Zerai/Zeray=ዘርኣይ, Okbay/Ogbay=ዑቕባይ, Hagos/Hagoss=ሓጎስ,"
    "Yemane/Yemani=የማነ, Afewerki/Afwerki=ኣፈወርቂ, Mesfin/Mesfen=መስፍን, Berhe/Birhe=በርሀ"
)
_ETHIOPIC = Origin(
    nationalities=("ERI", "ERI", "ETH"),
    male=_ETHIOPIC_MALE,
    female=_pool(
        "Helen/Hellen=ሄለን, Saba=ሳባ, Selam/Salam=ሰላም, Rahel/Rahil=ራሄል, Senait/Senayt=ሰናይት,"
        "Abrehet/Abrhet=ኣብረኸት, Almaz/Almas=ኣልማዝ, Yordanos/Yordanose=ዮርዳኖስ, Luwam/Luam=ሉዋም,"
        "Mihret/Mehret=ምሕረት, Tigist/Tegist=ትግስቲ, Semhar/Simhar=ሰምሃር, Winta/Wintana=ዊንታ,"
        "Feven/Fiven=ፌቨን, Ruta=ሩታ, Hiwet/Hiwot=ሕይወት, Meron/Miron=ሜሮን, Tsega/Tsiga=ጸጋ,"
        "Elsa=ኤልሳ, Lidya/Lydia=ሊድያ, Eden=ኤደን, Kisanet/Kisanat=ክሳነት, Mebrat/Mibrat=መብራት"
    ),
    family=_ETHIOPIC_MALE,
    towns=_towns("Asmara/Asmera, Keren, Mendefera/Mendefara, Dekemhare, Mekelle/Mekele, Adigrat"),
    common=(("Yohannes", "Tesfaye"), ("Tesfaye", "Gebremedhin")),
    patronymic=True,
    weight=0.15,
)
_BENGALI = Origin(
    nationalities=("BGD",),
    male=_pool(
        "Mohammad/Md/Muhammad/Mohammed=মোহাম্মদ, Abdul Karim/Abdul Kareem=আব্দুল করিম,"
        "Rahim/Raheem=রহিম, Karim/Kareem=করিম, Jamal/Jamaal=জামাল, Kamal/Kamaal=কামাল,"
        "Rafiq/Rafique/Rofiq=রফিক, Shahidul/Shohidul=শহিদুল, Habibur/Hobibur=হাবিবুর,"
        "Mizanur/Mijanur=মিজানুর, Sumon/Shumon=সুমন, Alamgir/Alomgir=আলমগীর, Rubel=রুবেল,"
        "Shafiqul/Shofiqul=শফিকুল, Monir/Moneer=মনির, Jahangir=জাহাঙ্গীর, Nurul/Noorul=নুরুল,"
        "Anisur/Anisor=আনিসুর, Mostafizur/Mustafizur=মোস্তাফিজুর, Saiful/Shaiful=সাইফুল,"
        "Nazrul/Nozrul=নজরুল, Delwar/Dilwar=দেলোয়ার, Harun/Haroon=হারুন, Belal/Bilal=বেলাল,"
        "Sohel/Sohail=সোহেল, Masud/Masood=মাসুদ, Ripon=রিপন, Liton/Litton=লিটন, Shamim=শামীম"
    ),
    female=_pool(
        "Nasrin/Nasreen=নাসরিন, Shahana/Sahana=শাহানা, Rokeya/Rokiya=রোকেয়া, Fatema=ফাতেমা,"
        "Taslima/Toslima=তাসলিমা, Rina/Reena=রিনা, Sultana=সুলতানা, Parvin/Parveen=পারভীন,"
        "Salma/Selma=সালমা, Jesmin/Jasmin=জেসমিন, Shirin/Sirin=শিরিন, Nazma/Najma=নাজমা,"
        "Rehana/Rihana=রেহানা, Shamima/Shameema=শামীমা, Morjina/Marjina=মর্জিনা, Rupa=রুপা,"
        "Hasina/Haseena=হাসিনা, Kulsum/Kulsoom=কুলসুম, Sharmin/Sarmin=শারমিন, Josna=জোসনা"
    ),
    family=_pool(
        "Hossain/Hosen/Hussain=হোসেন, Rahman/Rahaman=রহমান, Islam=ইসলাম, Uddin/Uddeen=উদ্দিন,"
        "Akter/Akhter/Aktar=আক্তার, Miah/Mia/Miya=মিয়া, Chowdhury/Choudhury=চৌধুরী,"
        "Alam/Alom=আলম, Sarker/Sarkar=সরকার, Begum/Begom=বেগম, Khan=খান, Sheikh/Shaikh=শেখ,"
        "Mollah/Molla=মোল্লা, Talukder/Talukdar=তালুকদার, Sikder/Sikdar=সিকদার, Kabir/Kobir=কবির,"
        "Mondal/Mandal=মণ্ডল, Haque/Hoque/Haq=হক, Mridha/Mirdha=মৃধা, Patwary/Patwari=পাটোয়ারী,"
        "Howlader/Hawlader=হাওলাদার, Biswas/Bishwas=বিশ্বাস, Sardar/Sarder=সরদার,"
        "Munshi/Munsi=মুন্সী, Majumder/Majumdar=মজুমদার, Siddique/Siddiqui=সিদ্দিকী"
    ),
    towns=_towns("Dhaka/Dacca, Sylhet/Silhet, Comilla/Cumilla, Noakhali, Chittagong/Chattogram"),
    common=(("Md", "Hossain"), ("Mohammad", "Rahman"), ("Mohammad", "Islam")),
    patronymic=False,
    weight=0.15,
)
_WEST_AFRICAN = Origin(
    nationalities=("NGA", "GHA", "NER", "MLI", "SEN", "GIN"),
    male=_pool(
        "Mamadou/Mamadu, Amadou/Ahmadou/Amadu, Ousmane/Usman, Ibrahima/Ibrahim, Moussa/Musa,"
        "Abdoulaye/Abdullahi, Boubacar/Bubakar/Aboubakar, Seydou/Seidou, Souleymane/Suleiman,"
        "Lamine/Lamin, Kwame/Kwami, Kofi/Koffi, Kwabena/Kwabina, Yaw/Yao, Kojo/Kodjo,"
        "Chinedu/Chinedum, Emeka, Oluwaseun/Oluseun, Babatunde, Adebayo, Issoufou/Issouf,"
        "Alhassane/Alhassan, Modou/Modu, Lansana, Sekou/Sékou, Mamadi/Mamady, Fode/Fodé, Alpha,"
        "Oumarou/Umaru, Hamidou/Hamadou, Idrissa/Idrisa, Adama, Bakary/Bakari, Karamoko,"
        "Sidiki/Siddiki, Yacouba/Yakuba, Kwaku, Kwesi/Kwasi, Obinna, Ikechukwu/Ikechuku,"
        "Uchenna/Uchena, Femi, Segun/Shegun, Tijani/Tidjani, Habibou/Habibu"
    ),
    female=_pool(
        "Aminata/Aminatou, Fatoumata/Fatimata/Fatumata, Mariama/Mariam, Kadiatou/Khadiatou,"
        "Aissatou/Aisatou, Hadiza/Hadizatou, Akosua, Abena/Abenaa, Efua, Ngozi, Chioma,"
        "Adaeze, Blessing, Salamatou/Salamatu, Binta/Bintou, Ramatoulaye/Ramatu, Awa,"
        "Rokia/Rokiatou, Oumou/Umu, Djeneba/Jeneba, Assetou/Assatou, Nafissatou/Nafisatu,"
        "Adjoa/Adwoa, Ama/Amma, Afia/Afua, Yaa, Funmilayo/Funmi, Folake, Amaka, Nneka, Ifeoma"
    ),
    family=_pool(
        "Diallo/Jallow/Djalo, Traore/Traoré, Toure/Touré, Konate/Konaté, Keita/Keïta,"
        "Coulibaly/Kulibali/Koulibaly, Camara/Kamara, Sow/Sowe, Bah/Ba, Barry/Bari,"
        "Cisse/Cissé, Mensah/Mensa, Owusu, Boateng, Asante, Osei, Okafor, Adeyemi,"
        "Bello/Belo, Okonkwo, Balogun, Garba, Issa/Isa, Mahamadou/Mahamadu, Sylla/Silla,"
        "Sanogo, Ouedraogo/Wedraogo, Sawadogo, Diarra/Jarra, Sangare/Sangaré, Doumbia/Dumbia,"
        "Kone/Koné, Ouattara/Watara, Fofana, Dembele/Dembélé, Kante/Kanté, Sissoko/Sisoko,"
        "Diop, Ndiaye/Njie, Fall, Faye/Fay, Gueye/Gaye, Sarr/Sar, Amoah/Amoa, Nwosu,"
        "Agyeman/Agyemang, Eze/Ezeh, Obi, Okeke, Ogunleye"
    ),
    towns=_towns("Kano, Accra/Akra, Kumasi, Niamey, Bamako, Agadez, Zinder, Conakry, Dakar"),
    common=(("Mamadou", "Diallo"), ("Ibrahima", "Diallo"), ("Amadou", "Traore")),
    patronymic=False,
    weight=0.20,
)
_FILIPINO = Origin(
    nationalities=("PHL",),
    male=_pool(
        "Jose, Rodel/Rodell, Jonathan/Jonathon, Ramon, Mark Anthony/Marc Anthony,"
        "John Paul/Jon Paul, Rolando, Ricardo, Eduardo/Edwardo, Reynaldo, Arnel/Arnell,"
        "Romeo, Noel, Danilo/Danillo, Jerome, Christopher/Cristopher, Ferdinand, Rogelio,"
        "Ernesto, Renato, Jaime/Jayme, Antonio, Roberto, Joel, Rommel/Romel, Dennis/Denis,"
        "Manuel, Alvin, Ariel, Jayson/Jason, Mario, Wilfredo"
    ),
    female=_pool(
        "Maria Cristina/Ma. Cristina, Marites/Maritess, Liza/Lisa, Analyn/Annalyn,"
        "Mary Grace/Marygrace, Cristina/Kristina/Christina, Rowena, Jocelyn/Joselyn,"
        "Maricel/Maricell, Rosalie, Jennifer/Jenifer, Lorna, Evangeline, Maria,"
        "Josephine/Josefina, Lourdes, Teresita, Corazon, Rosario, Gina, Emily/Emely,"
        "Michelle/Michele, Aileen/Eileen, Sheila/Shiela, Rhea/Ria, Melanie/Melany, Janet"
    ),
    family=_pool(
        "Santos, Reyes, Cruz, Dela Cruz/Delacruz/De la Cruz, Bautista, Garcia, Mendoza,"
        "Villanueva, Ramos, Aquino, Castillo, Fernandez/Fernandes, Gonzales/Gonzalez,"
        "Lopez/Lopes, Flores, Torres, Navarro, Salazar, Pascual, Rivera, Santiago, Dizon,"
        "De Guzman/Deguzman, Manalo, Tolentino, Mercado, Soriano, Padilla, Lim, Tan, Sison,"
        "Domingo, Morales, Valdez/Valdes, Aguilar, Perez/Peres, Castro, Ocampo, Magbanua,"
        "Enriquez/Enriques, Panganiban, Evangelista, Francisco, Salvador, Marquez/Marques"
    ),
    towns=_towns("Manila, Cebu, Davao, Iloilo, Quezon City, Batangas, Pampanga"),
    common=(("Maria", "Santos"), ("Jose", "Reyes"), ("Maria", "Dela Cruz")),
    patronymic=False,
    weight=0.10,
)
ORIGINS: tuple[Origin, ...] = (_ARABIC, _ETHIOPIC, _BENGALI, _WEST_AFRICAN, _FILIPINO)

_Name = tuple[tuple[str, ...], str | None]
_TYPO_LETTERS = "abdehiklmnorstuy"


@dataclass(frozen=True)
class Labelled:
    """One registration document, the site it was made at, and the truth."""

    doc: dict[str, Any]
    site: str
    true_person: int


@dataclass
class _Person:
    origin: Origin
    sex: str
    given: _Name
    father: _Name
    family: _Name
    born: tuple[int, int, int]
    nationality: str
    document: tuple[str, str] | None  # (type, number)
    phone: str | None
    town: tuple[str, ...] | None
    spelling: dict[str, int] = field(default_factory=dict)  # preferred variant per name
    number: int = -1  # the true person id


def _find(pool: tuple[_Name, ...], latin: str) -> _Name:
    return next((n for n in pool if n[0][0] == latin), ((latin,), None))


def _number(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.3:
        return "national_id", "".join(str(rng.randint(0, 9)) for _ in range(rng.choice((10, 14))))
    prefix = rng.choice(("P", "A", "E", "B", "EP", "BX"))
    return "passport", prefix + str(rng.randint(10**6, 10**8 - 1))


def _phone(rng: random.Random) -> str:
    return f"9{rng.randint(1, 5)}{rng.randint(1_000_000, 9_999_999)}"


def _person(
    rng: random.Random, origin: Origin, sex: str, born_year: int, **fixed: _Name
) -> _Person:
    given_pool = origin.male if sex == "male" else origin.female
    nationality = rng.choice(origin.nationalities)
    return _Person(
        origin=origin,
        sex=sex,
        given=fixed.get("given") or rng.choice(given_pool),
        father=fixed.get("father") or rng.choice(origin.male),
        family=fixed.get("family") or rng.choice(origin.family),
        born=(born_year, rng.randint(1, 12), rng.randint(1, 28)),
        nationality=nationality,
        document=_number(rng) if rng.random() < 0.7 else None,
        phone=_phone(rng) if rng.random() < 0.8 else None,
        town=rng.choice(origin.towns) if rng.random() < 0.8 else None,
    )


def _spell(rng: random.Random, person: _Person, name: _Name) -> str:
    variants = name[0]
    preferred = person.spelling.setdefault(variants[0], rng.randrange(len(variants)))
    return variants[preferred] if rng.random() < 0.55 else rng.choice(variants)


def _typo(rng: random.Random, word: str) -> str:
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(4)
    if kind == 0:
        return word[:i] + word[i + 1 :]
    if kind == 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    letter = rng.choice(_TYPO_LETTERS)
    return word[:i] + letter + word[i + (kind == 2) :]


def _names(rng: random.Random, person: _Person) -> dict[str, Any]:
    parts = [person.given, person.family]
    if person.origin.patronymic and rng.random() < 0.15:
        parts.insert(1, person.father)  # the father's name written as a middle name
    given = [_spell(rng, person, parts[0])]
    family = [_spell(rng, person, p) for p in parts[1:]]
    if rng.random() < 0.08:
        which = rng.choice((given, family))
        which[-1] = _typo(rng, which[-1])
    originals = [p[1] for p in parts]
    names: dict[str, Any] = {"given": " ".join(given), "family": " ".join(family)}
    if all(originals) and rng.random() < 0.45:
        names["given_original"] = originals[0]
        names["family_original"] = " ".join(o for o in originals[1:] if o)
        if rng.random() < 0.08:
            del names["given"], names["family"]  # written in the original script only
    if rng.random() < 0.07:  # given and family swapped
        for latin, original in (("given", "family"), ("given_original", "family_original")):
            if latin in names:
                names[latin], names[original] = names[original], names[latin]
    return names


def _birth(rng: random.Random, person: _Person) -> dict[str, str] | None:
    year, month, day = person.born
    roll = rng.random()
    if roll < 0.08:
        return None
    if roll < 0.6:
        if rng.random() < 0.03:  # a slip of the pen
            month, day = (day, month) if day <= 12 else (month, max(1, day - 1))
        return {"value": f"{year}-{month:02d}-{day:02d}", "precision": "exact"}
    if roll < 0.8:
        year += rng.choice((0,) * 8 + (-1, 1))
        return {"value": f"{min(year, LAST_BIRTH_YEAR)}-01-01", "precision": "year"}
    year += rng.choice((0, 0, -1, 1, -2, 2, 3, -3))
    return {"value": f"{min(year, LAST_BIRTH_YEAR)}-01-01", "precision": "estimated"}


def _formatted(rng: random.Random, number: str) -> str:
    roll = rng.random()
    if roll < 0.1:
        return " ".join(number[i : i + 4] for i in range(0, len(number), 4))
    if roll < 0.15:
        return number.lower()
    if roll < 0.18:
        return number[:2] + "-" + number[2:]
    if roll < 0.2:
        i = rng.randrange(2, len(number))
        return number[:i] + str((int(number[i]) + 1) % 10) + number[i + 1 :]  # a typo
    return number


def _document(rng: random.Random, person: _Person) -> list[dict[str, Any]]:
    if person.document is not None and rng.random() < 0.55:
        kind, number = person.document
        status = rng.choice(("held", "held", "confiscated"))
        return [
            {
                "type": kind,
                "status": status,
                "number": _formatted(rng, number),
                "issuing_country": person.nationality,
            }
        ]
    if rng.random() < 0.3:
        return [{"type": "passport", "status": rng.choice(("lost", "confiscated", "none"))}]
    return []


def _registration(
    rng: random.Random, person: _Person, household: dict[str, str] | None, phone: str | None
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "names": _names(rng, person),
        "situation": {"scenario": "crossed_border", "needs": ["food"]},
        "consent": {"given": True, "legal_basis": "consent", "recorded_by": "bench"},
    }
    if rng.random() < 0.92:
        sex = person.sex if rng.random() > 0.005 else {"male": "female"}.get(person.sex, "male")
        doc["sex"] = sex
    birth = _birth(rng, person)
    if birth:
        doc["date_of_birth"] = birth
    if rng.random() < 0.88:
        second = ["LBY"] if rng.random() < 0.03 and person.nationality != "LBY" else []
        doc["nationalities"] = [person.nationality, *second]
    doc["documents"] = _document(rng, person)
    phone = phone if rng.random() > 0.1 else _phone(rng)  # a new SIM card
    if phone and rng.random() < 0.65:
        styles = [f"+218 {phone[:2]} {phone[2:5]} {phone[5:]}", f"0{phone}", f"00218{phone}"]
        doc["phone"] = rng.choice(styles)
    if person.town and rng.random() < 0.4:
        doc["place_of_birth"] = rng.choice(person.town)
    if household:
        doc["household"] = household
    return doc


def _household(rng: random.Random, head: _Person) -> list[tuple[_Person, str]]:
    """A head's household: maybe a spouse, and children who carry the head's family
    name (or, with patronymic naming, the father's given name); now and then twins.
    Nobody in a household shares a given name."""
    origin, members = head.origin, [(head, "head")]
    year, child_family = head.born[0], head.family
    if origin.patronymic and head.sex == "male":
        child_family = head.given

    def add(sex: str, born: int, role: str, **fixed: _Name) -> _Person:
        taken = {m.given for m, _ in members}
        pool = [g for g in (origin.male if sex == "male" else origin.female) if g not in taken]
        member = _person(rng, origin, sex, born, given=rng.choice(pool), **fixed)
        members.append((member, role))
        return member

    if rng.random() < 0.7:
        keep = {} if origin.patronymic or rng.random() < 0.5 else {"family": head.family}
        add("female" if head.sex == "male" else "male", year + rng.randint(-3, 8), "spouse", **keep)
    last = min(year + 45, LAST_BIRTH_YEAR)
    for born in sorted(rng.sample(range(year + 18, last + 1), rng.randint(1, 3))):
        child = add(rng.choice(("male", "female")), born, "child", family=child_family)
    if rng.random() < 0.05:  # twins: the same birth date, another given name
        add(child.sex, child.born[0], "child", family=child_family).born = child.born
    return members


def generate(persons: int = 5_000, *, seed: int = 1) -> list[Labelled]:
    """Return about 1.75 registrations per true person, shuffled, reproducible by `seed`."""
    rng = random.Random(seed)
    out: list[Labelled] = []
    number = 0
    weights = [o.weight for o in ORIGINS]
    while number < persons:
        origin = rng.choices(ORIGINS, weights)[0]
        sex = rng.choice(("male", "female"))
        fixed: dict[str, _Name] = {}
        if rng.random() < 0.08:  # a very common name, carried by many people
            given, family = rng.choice(origin.common)
            sex = "female" if any(given == n[0][0] for n in origin.female) else "male"
            fixed = {"given": _find(origin.male + origin.female, given)}
            fixed["family"] = _find(origin.family, family)
        head = _person(rng, origin, sex, rng.randint(1960, 2004), **fixed)
        group = _household(rng, head) if rng.random() < 0.15 else [(head, "")]
        for member, _ in group:
            member.number, number = number, number + 1
        for event in range(rng.choices((1, 2, 3), (0.4, 0.35, 0.25))[0]):
            site = rng.choice(SITES)
            group_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            for member, role in group:
                if event and rng.random() < 0.1:
                    continue  # this member was not there that day
                link = {"group_id": group_id, "relationship": role} if role else None
                shared = role and head.phone and rng.random() < 0.8  # one phone per family
                doc = _registration(rng, member, link, head.phone if shared else member.phone)
                out.append(Labelled(doc, site, member.number))
    rng.shuffle(out)
    return out
