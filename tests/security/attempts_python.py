"""Attempts: the peer's escapes, classic Python sandbox walks, gadgets, decode-time code.

Placeholders (filled per run by `Evidence.render`): @CANARY@ a file with a secret, @WRITE@ a
path that must not come to exist, @MARKER@ a file a subprocess would create, @ENV@ the name
of the environment variable holding the secret, @PORT@ a loopback socket, @DONE@ a token.
"""

from __future__ import annotations

from security_harness import Attempt

__all__ = ["PYTHON_ATTEMPTS", "frame_walk", "via_builtins", "via_globals", "via_os", "via_sys"]


def via_os(expr: str) -> str:
    """Body lines that, given an expression reaching `os`, prove it: the secret and the PID."""
    return f"o = {expr}\nleak = interlace.save([str(o), o.environ.get('@ENV@'), o.getpid()])\n"


def via_sys(expr: str) -> str:
    return f"s = {expr}\nleak = interlace.save([str(s), s.modules['os'].environ.get('@ENV@')])\n"


def via_globals(expr: str) -> str:
    """Given a module's globals dict: what it holds that reaches the interpreter."""
    return (f"g = {expr}\nleak = interlace.save([str(g.get(n)) for n in ('sys', '_sys', 'os', '_os', 'builtins')]"
            " + [str(g.get('__builtins__'))[:4000]])\n")


def via_builtins(expr: str) -> str:
    """Given the real builtins (module or dict): read the canary with its `open`."""
    return (f"b = {expr}\nopener = b['open'] if isinstance(b, dict) else b.open\n"
            "leak = interlace.save([str(b)[:4000], opener('@CANARY@').read()])\n")


def frame_walk(start: str) -> str:
    """From a frame, up through f_back, collecting any sys/os a frame's globals hold."""
    return (f"fr = {start}\nfound = []\nwhile fr is not None:\n    gl = fr.f_globals\n"
            "    for nm in ('sys', '_sys', 'os', '_os'):\n        if nm in gl:\n            found.append(str(gl[nm]))\n"
            "    fr = fr.f_back\nleak = interlace.save(found)\n")


WRAP_CLOSE = """
wc = None
for c in {subclasses}:
    if c.__name__ == '_wrap_close':
        wc = c
"""

PYTHON_ATTEMPTS = [
    # --- the peer's four (ndif-server.md section 4.2), and its loader read ---------------------
    Attempt("peer_subclasses_wrap_close", "peer",
            WRAP_CLOSE.format(subclasses="().__class__.__base__.__subclasses__()")
            + "g = wc.__init__.__globals__\nleak = interlace.save([str(g['sys']), g['getpid'](), g['environ'].get('@ENV@')])\n"),
    Attempt("peer_vars_collections_sys", "peer", "import collections\n" + via_sys("vars(collections)['_sys']")),
    Attempt("peer_collections_dict_sys", "peer", "import collections\n" + via_sys("collections.__dict__['_sys']")),
    Attempt("peer_enum_unique_globals", "peer", "import enum\n" + via_sys("enum.unique.__globals__['sys']")),
    Attempt("peer_timeit_prefix", "peer", "import timeit\n" + via_sys("vars(timeit)['sys']")),
    Attempt("peer_loader_get_data", "peer",
            "import collections\nleak = interlace.save(collections.__loader__.get_data('@CANARY@'))\n"),
    # --- classic walks -------------------------------------------------------------------------
    Attempt("walk_mro_object_subclasses", "walk",
            WRAP_CLOSE.format(subclasses="''.__class__.__mro__[-1].__subclasses__()")
            + via_globals("wc.__init__.__globals__")),
    Attempt("walk_type_subclasses_type", "walk",
            "for c in type.__subclasses__(type):\n    if c.__name__ in ('EnumType', 'EnumMeta'):\n        meta = c\n"
            + via_sys("meta.__call__.__globals__['sys']")),
    Attempt("walk_getattr_built_names", "walk",
            "d = '__'\nsubs = getattr(getattr(getattr((), d + 'cla' + 'ss' + d), d + 'ba' + 'se' + d), d + 'subcla' + 'sses' + d)()\n"
            "wc = [c for c in subs if getattr(c, d + 'name' + d) == '_wrap_close'][0]\n"
            + via_globals("getattr(getattr(wc, d + 'init' + d), d + 'glo' + 'bals' + d)")),
    Attempt("walk_getattr_func_globals", "walk",
            "import collections\n" + via_globals("getattr(collections.namedtuple, '__glob' + 'als__')")),
    Attempt("walk_getattr_private_module_attr", "walk",
            "import collections\n" + via_sys("getattr(collections, '_' + 'sys')")),
    Attempt("walk_hasattr_then_getattr", "walk",
            "import random\nname = '_o' + 's'\nok = hasattr(random, name)\n" + via_os("getattr(random, name)")),
    Attempt("walk_setattr_builtins_on_function", "walk",
            "def f():\n    return open('@CANARY@').read()\nsetattr(f, '__glo' + 'bals__', {})\n"
            "leak = interlace.save(f())\n"),
    Attempt("walk_vars_module", "walk", "import random\n" + via_os("vars(random)['_os']")),
    Attempt("walk_globals_builtins", "walk", via_builtins("globals()['__builtins__']")),
    Attempt("walk_locals", "walk", "x = locals()\n" + via_builtins("x['__builtins__']")),
    Attempt("walk_eval", "walk", via_os("eval(\"__import__('os')\")")),
    Attempt("walk_exec", "walk", "ns = {}\nexec(\"import os\\nv = os.environ.get('@ENV@')\", ns)\nleak = interlace.save(ns['v'])\n"),
    Attempt("walk_compile", "walk",
            "code = compile(\"import os\", '<x>', 'exec')\nns = {}\nexec(code, ns)\n" + via_os("ns['os']")),
    Attempt("walk_dunder_import", "walk", via_os("__import__('os')")),
    Attempt("walk_import_os", "walk", "import os\n" + via_os("os")),
    Attempt("walk_importlib", "walk", "import importlib\n" + via_os("importlib.import_module('os')")),
    Attempt("walk_open_read", "walk", "leak = interlace.save(open('@CANARY@').read())\n"),
    Attempt("walk_open_write", "walk", "open('@WRITE@', 'w').write('pwned')\n"),
    Attempt("walk_breakpoint", "walk", "breakpoint()\ndone = interlace.save('@DONE@')\n"),
    Attempt("walk_builtin_self", "walk", via_builtins("len.__self__")),
    Attempt("walk_getattr_builtin_self", "walk", via_builtins("getattr(print, '__se' + 'lf__')")),
    Attempt("walk_type_dict_subclasses", "walk",
            WRAP_CLOSE.format(subclasses="type.__dict__['__subclasses__'](object)") + via_globals("wc.__init__.__globals__")),
    Attempt("walk_object_getattribute", "walk",
            "import collections\n" + via_globals("object.__getattribute__(collections.namedtuple, '__globals__')")),
    Attempt("walk_type_getattribute_str", "walk",
            "import collections\nga = type.__getattribute__\n" + via_sys("ga(collections, '_sys')")),
    Attempt("walk_format_globals", "walk",
            "import collections\nleak = interlace.save('{0.__globals__[_sys]}'.format(collections.namedtuple))\n"),
    Attempt("walk_format_map", "walk",
            "import collections\nleak = interlace.save('{f.__globals__[_sys]}'.format_map({'f': collections.namedtuple}))\n"),
    Attempt("walk_string_formatter", "walk",
            "import collections, string\n"
            "leak = interlace.save(string.Formatter().format('{0.__globals__[_sys]}', collections.namedtuple))\n"),
    Attempt("walk_formatter_get_field", "walk",
            "import collections, string\n"
            + via_globals("string.Formatter().get_field('0.__globals__', [collections.namedtuple], {})[0]")),
    Attempt("walk_operator_attrgetter", "walk",
            "import collections, operator\n" + via_globals("operator.attrgetter('__globals__')(collections.namedtuple)")),
    Attempt("walk_operator_methodcaller", "walk",
            "import operator\nsubs = operator.methodcaller('__subclasses__')(object)\n"
            "wc = [c for c in subs if operator.attrgetter('__name__')(c) == '_wrap_close'][0]\n"
            + via_globals("operator.attrgetter('__init__.__globals__')(wc)")),
    Attempt("walk_generator_frame", "walk",
            "def walker():\n    yield me.gi_frame.f_back\nme = walker()\n" + frame_walk("next(me)")),
    Attempt("walk_generator_gi_frame_globals", "walk",
            "def gen():\n    yield 1\ng = gen()\n" + via_builtins("g.gi_frame.f_globals['__builtins__']")),
    Attempt("walk_coroutine_frame", "walk",
            "async def co():\n    return me.cr_frame.f_back\nme = co()\n"
            "try:\n    me.send(None)\nexcept StopIteration as stop:\n    start = stop.value\n" + frame_walk("start")),
    Attempt("walk_traceback_frame", "walk",
            "try:\n    1 / 0\nexcept Exception as e:\n    start = e.__traceback__.tb_frame\n" + frame_walk("start")),
    Attempt("walk_traceback_engine_frames", "walk",
            "try:\n    model.transformer.h[99].output\nexcept Exception as e:\n    tb = e.__traceback__\n"
            "frames = []\nwhile tb is not None:\n    frames.append(tb.tb_frame)\n    tb = tb.tb_next\n"
            + frame_walk("frames[-1]")),
    Attempt("walk_getattr_traceback", "walk",
            "try:\n    1 / 0\nexcept Exception as e:\n    tb = getattr(e, '__trace' + 'back__')\n"
            + frame_walk("getattr(tb, 'tb_' + 'frame')")),
    Attempt("walk_func_code_replace", "walk",
            "import collections\ndef f():\n    return _sys\n"
            "g = type(f)(f.__code__, collections.namedtuple.__globals__)\n" + via_sys("g()")),
    Attempt("walk_func_globals_builtins", "walk",
            "def f():\n    pass\n" + via_builtins("f.__globals__['__builtins__']")),
    Attempt("walk_decorator_globals", "walk",
            "def deco(fn):\n    return getattr(fn, '__glo' + 'bals__')\n@deco\ndef x():\n    pass\n"
            + via_builtins("x['__builtins__']")),
    Attempt("walk_metaclass_mro", "walk",
            "class Meta(type):\n    pass\n"
            + WRAP_CLOSE.format(subclasses="Meta.__mro__[-1].__subclasses__()") + via_globals("wc.__init__.__globals__")),
    Attempt("walk_metaclass_new_namespace", "walk",
            "class Meta(type):\n    def __new__(mcs, name, bases, ns):\n        cls = type.__new__(mcs, name, bases, ns)\n"
            "        cls.found = [c for c in object.__subclasses__() if c.__name__ == '_wrap_close']\n        return cls\n"
            "class A(metaclass=Meta):\n    pass\n" + via_globals("A.found[0].__init__.__globals__")),
    Attempt("walk_init_subclass", "walk",
            "found = []\nclass Base:\n    def __init_subclass__(cls, **kw):\n"
            "        found.extend(c for c in cls.__mro__[-1].__subclasses__() if c.__name__ == '_wrap_close')\n"
            "class Child(Base):\n    pass\n" + via_globals("found[0].__init__.__globals__")),
    Attempt("walk_class_getitem", "walk",
            "class K:\n    def __class_getitem__(cls, item):\n        return item.__globals__\n"
            "import collections\n" + via_globals("K[collections.namedtuple]")),
    Attempt("walk_super_getattribute", "walk",
            "import collections\nf = collections.namedtuple\n" + via_globals("super(type(f), f).__getattribute__('__globals__')")),
    Attempt("walk_exception_context_frame", "walk",
            "try:\n    import os\nexcept Exception as e:\n    start = e.__traceback__.tb_frame\n" + frame_walk("start")),
    Attempt("walk_property_fget_globals", "walk",
            "import enum\n" + via_sys("enum.property.__get__.__globals__['sys']")),
    # --- attribute access the guards cannot see: C-level getattr with names built at run time
    Attempt("walk_dynamic_format_private", "walk",
            "import collections\nfmt = '{0.' + '_sys}'\nleak = interlace.save(fmt.format(collections))\n"),
    Attempt("walk_dynamic_format_globals", "walk",
            "import torch.nn.functional as F\nfmt = '{0.__glo' + 'bals__[__builtins__][open]}'\n"
            "leak = interlace.save(fmt.format(F.relu))\n"),
    Attempt("walk_dynamic_format_namedtuple", "walk",
            "import collections\nfmt = '{0.__glo' + 'bals__[_sys]}'\nleak = interlace.save(fmt.format(collections.namedtuple))\n"),
    Attempt("walk_dynamic_formatter_get_field", "walk",
            "import collections, string\nf = string.Formatter().get_field('0.' + '_sys', [collections], {})[0]\n"
            "leak = interlace.save(str(f))\n"),
    Attempt("walk_dynamic_attrgetter", "walk",
            "import collections, operator\nleak = interlace.save(str(operator.attrgetter('_' + 'sys')(collections)))\n"),
    Attempt("walk_dynamic_attrgetter_globals", "walk",
            "import collections, operator\n"
            + via_globals("operator.attrgetter('__glo' + 'bals__')(collections.namedtuple)")),
    Attempt("walk_reduce_getattr_map", "walk",
            "import collections, functools\nleak = interlace.save(str(functools.reduce(getattr, ['_' + 'sys'], collections)))\n"),
    Attempt("walk_map_getattr", "walk",
            "import collections\nleak = interlace.save(str(list(map(getattr, [collections], ['_' + 'sys']))))\n"),
    Attempt("walk_type_hints_eval", "walk",
            "import typing\ndef f(x: \"[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]"
            ".__init__.__globals__['sys']\"):\n    pass\nleak = interlace.save(str(typing.get_type_hints(f)['x']))\n"),
    Attempt("walk_forward_ref_eval", "walk",
            "import typing\nref = typing.ForwardRef(\"().__class__.__base__.__subclasses__()\")\n"
            "leak = interlace.save(str(typing.get_type_hints(type('K', (), {'__annotations__': {'a': ref}}))))\n"),
    Attempt("walk_type_dynamic_dunder_class", "walk",
            "import copy, collections, operator\n"
            "G = type('G', (), {'__red' + 'uce__': lambda self: (operator.attrgetter('_' + 'sys'), (collections,))})\n"
            "leak = interlace.save(str(copy.deepcopy(G())))\n"),
    Attempt("walk_dataclass_field_default_factory", "walk",
            "import dataclasses, collections, operator\n"
            "D = dataclasses.make_dataclass('D', [('a', str, dataclasses.field(default_factory=lambda: "
            "str(operator.attrgetter('_' + 'sys')(collections))))])\nleak = interlace.save(D().a)\n"),
    # --- gadgets: __reduce__ through copy, setattr bypass through state ------------------------
    Attempt("gadget_deepcopy_reduce_getattr", "gadget",
            "import copy, collections\nclass G:\n    def __reduce__(self):\n        return (getattr, (collections, '_sys'))\n"
            + via_sys("copy.deepcopy(G())")),
    Attempt("gadget_copy_reduce_ex_attrgetter", "gadget",
            "import copy, operator, random\nclass G:\n    def __reduce_ex__(self, proto):\n"
            "        return (operator.attrgetter('_os'), (random,))\n" + via_os("copy.copy(G())")),
    Attempt("gadget_deepcopy_state_patches_torch", "gadget",
            "import copy\nimport torch.nn.functional as F\nfake = lambda x, dim=None, dtype=None, **k: x * 0 + 1\n"
            "class G:\n    def __reduce__(self):\n        return (lambda: F, (), {'softmax': fake})\ncopy.deepcopy(G())\n"),
    Attempt("gadget_deepcopy_dictitems_sysmodules", "gadget",
            "import copy, collections\nclass G:\n    def __reduce__(self):\n"
            "        return (getattr, (collections, '_sys'), None, None, None)\n"
            "s = copy.deepcopy(G())\nleak = interlace.save(str(s.modules.get('os')))\n"),
    Attempt("gadget_copyreg_dispatch", "gadget",
            "import copy\nimport collections\n"
            "copy.dispatch_table[int] = lambda x: (getattr, (collections, '_sys'))\n" + via_sys("copy.copy(5)")),
    Attempt("gadget_reduce_builtins_open", "gadget",
            "import copy\nclass G:\n    def __reduce__(self):\n        return (open, ('@CANARY@',))\n"
            "leak = interlace.save(copy.deepcopy(G()).read())\n"),
    # --- code that runs when the request is decoded (class bodies, defaults) -----------------
    Attempt("decode_class_body_import_os", "decode", "leak = interlace.save(Evil.leaked)\n",
            prelude="class Evil:\n    import os\n    leaked = os.environ.get('@ENV@')\n"),
    Attempt("decode_class_body_collections_sys", "decode", "leak = interlace.save(Evil.leaked)\n",
            prelude="import collections\n\nclass Evil:\n    leaked = str(vars(collections)['_sys'].modules['os'].environ.get('@ENV@'))\n"),
    Attempt("decode_default_argument", "decode", "leak = interlace.save(f())\n",
            prelude="import random\n\ndef f(o=getattr(random, '_' + 'os')):\n    return [str(o), o.environ.get('@ENV@')]\n"),
    Attempt("decode_decorator_runs", "decode", "leak = interlace.save(f())\n",
            prelude="import collections\n\ndef grab(fn):\n    return lambda: str(getattr(collections, '_sys'))\n\n@grab\ndef f():\n    return 1\n"),
    Attempt("decode_metaclass_runs", "decode", "leak = interlace.save(K.found)\n",
            prelude="import random\n\nclass M(type):\n    def __new__(mcs, name, bases, ns):\n"
                    "        ns['found'] = str(getattr(random, '_os').environ.get('@ENV@'))\n"
                    "        return type.__new__(mcs, name, bases, ns)\n\nclass K(metaclass=M):\n    pass\n"),
]
