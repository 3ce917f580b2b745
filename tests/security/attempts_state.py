"""Attempts: changing the next job's result, exhausting resources, reading another user's data.

A "next job" attempt succeeds quietly; the test's normal job afterwards (another key) is the
evidence. A resource attempt is bounded so that even escaping it cannot harm the machine: it
stops by itself a few seconds (or at most ~1.5 GiB) beyond the suite's limits (`LIMITS`) and
then saves its @DONE@ token, so finishing is the evidence that the limit did not hold.
"""

from __future__ import annotations

from security_harness import LIMITS, Attempt

__all__ = ["STATE_ATTEMPTS"]

_OVER = LIMITS["timeout_seconds"] * 3  # seconds a time attempt runs when nothing stops it
_MB = LIMITS["max_memory_bytes"] >> 20

STATE_ATTEMPTS = [
    # --- changing the next job's result -------------------------------------------------------
    Attempt("next_register_forward_hook", "nextjob",
            "model.transformer.h[0].register_forward_hook(lambda m, i, o: o * 0)\n"),
    Attempt("next_register_forward_pre_hook", "nextjob",
            "model.transformer.ln_f.register_forward_pre_hook(lambda m, a: (a[0] * 0,))\n"),
    Attempt("next_global_module_hook", "nextjob",
            "torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o * 0 if torch.is_tensor(o) else o)\n"),
    Attempt("next_private_hooks_dict", "nextjob",
            "model.transformer.h[0]._forward_hooks[987654] = lambda m, i, o: o * 0\n"),
    Attempt("next_param_data_zero", "nextjob", "model.transformer.h[0].mlp.c_fc.weight.data.zero_()\n"),
    Attempt("next_weight_numpy_write", "nextjob",
            "w = model.lm_head.weight.detach().numpy()\nw[:] = 0\n"),
    Attempt("next_weight_inplace_no_grad", "nextjob",
            "with torch.no_grad():\n    model.transformer.wte.weight.mul_(0)\n"),
    Attempt("next_weight_setitem", "nextjob", "model.transformer.ln_f.weight[0] = 99.0\n"),
    Attempt("next_module_eps", "nextjob", "model.transformer.ln_f.eps = 1.0\n"),
    Attempt("next_replace_submodule", "nextjob", "model.transformer.h[0].mlp = torch.nn.Identity()\n"),
    Attempt("next_forward_replaced", "nextjob", "model.transformer.ln_f.forward = lambda x: x * 0\n"),
    Attempt("next_setattr_forward", "nextjob", "setattr(model.transformer.ln_f, 'forward', lambda x: x * 0)\n"),
    Attempt("next_del_layer", "nextjob", "del model.transformer.h[3]\n"),
    Attempt("next_default_dtype", "nextjob", "torch.set_default_dtype(torch.float64)\n"),
    Attempt("next_default_device", "nextjob", "torch.set_default_device('meta')\n"),
    Attempt("next_torch_manual_seed", "nextjob", "torch.manual_seed(1234)\n"),
    Attempt("next_random_seed", "nextjob", "import random\nrandom.seed(1234)\n"),
    Attempt("next_random_function_replaced", "nextjob", "import random\nrandom.random = lambda: 0.25\n"),
    Attempt("next_model_half", "nextjob", "model.transformer.half()\n"),
    Attempt("next_model_train", "nextjob", "model.transformer.train()\n"),
    Attempt("next_config_change", "nextjob", "model.config.output_hidden_states = True\n"),
    Attempt("next_config_n_layer", "nextjob", "model.config.n_layer = 2\nmodel.config.output_attentions = True\n"),
    Attempt("next_requires_grad_left", "nextjob", "model.transformer.wte.weight.requires_grad_(False)\n"),
    Attempt("next_functional_patched", "nextjob",
            "import torch.nn.functional as F\nF.softmax = lambda x, dim=None, dtype=None, **k: x * 0 + 1\n"),
    Attempt("next_tensor_method_patched", "nextjob",
            "torch.Tensor.softmax = lambda self, *a, **k: self * 0\ntorch.Tensor.__add__ = lambda a, b: a\n"),
    Attempt("next_module_call_patched", "nextjob",
            "torch.nn.Module.__call__ = lambda self, *a, **k: a[0]\n"),
    Attempt("next_json_patched", "nextjob", "import json\njson.dumps = lambda *a, **k: '{}'\njson.loads = lambda *a, **k: {}\n"),
    Attempt("next_grad_enabled_global", "nextjob", "torch.set_grad_enabled(True)\ntorch.set_default_dtype(torch.float16)\n"),
    Attempt("next_edit_inplace", "nextjob",
            "with model.edit(inplace=True):\n    model.transformer.h[0].output[:] = 0\n"),
    Attempt("next_buffer_registered", "nextjob",
            "model.transformer.h[0].attn.register_buffer('stash', torch.ones(1))\nmodel.transformer.h[0].extra = 1\n"),
    Attempt("next_load_state_dict", "nextjob",
            "sd = model.transformer.ln_f.state_dict()\nmodel.transformer.ln_f.load_state_dict({k: v * 0 for k, v in sd.items()})\n"),
    Attempt("next_apply_zero", "nextjob", "model.transformer.ln_f.apply(lambda m: m.weight.data.zero_() if hasattr(m, 'weight') else None)\n"),
    Attempt("next_torch_function_mode_left", "nextjob",
            "class M(torch.overrides.TorchFunctionMode):\n"
            "    def __torch_function__(self, func, types, args=(), kwargs=None):\n"
            "        out = func(*args, **(kwargs or {}))\n        return out * 0 if isinstance(out, torch.Tensor) else out\n"
            "def hold():\n    with M():\n        yield 1\nit = hold()\nnext(it)\nkeep = [it]\nkeep.append(keep)\n"),
    Attempt("next_grad_mode_left_by_generator", "nextjob",
            "def hold():\n    with torch.enable_grad():\n        yield 1\nit = hold()\nnext(it)\nkeep = [it]\nkeep.append(keep)\n"),
    Attempt("next_weight_norm", "nextjob", "torch.nn.utils.weight_norm(model.transformer.h[0].mlp.c_fc)\n"),
    Attempt("next_parametrize", "nextjob",
            "class Z(torch.nn.Module):\n    def forward(self, w):\n        return w * 0\n"
            "torch.nn.utils.parametrize.register_parametrization(model.transformer.ln_f, 'weight', Z())\n"),
    Attempt("next_init_zeros", "nextjob", "torch.nn.init.zeros_(model.transformer.ln_f.weight)\n"),
    Attempt("next_tensor_set_storage", "nextjob", "model.transformer.ln_f.weight.set_(torch.zeros(128))\n"),
    Attempt("next_grad_left", "nextjob", "model.transformer.ln_f.weight.grad = torch.ones(128)\n"),
    # class-level and module-level changes made by library code on the body's behalf (its own
    # setattr is not the guarded one)
    Attempt("next_dataclass_on_torch_class", "nextjob", "import dataclasses\ndataclasses.dataclass(torch.nn.LayerNorm)\n"),
    Attempt("next_dataclass_frozen_linear", "nextjob",
            "import dataclasses\ndataclasses.dataclass(frozen=True)(torch.nn.Linear)\n"),
    Attempt("next_enum_global_enum_functional", "nextjob",
            "import enum\nE = enum.Enum('E', {'softmax': 1, 'gelu': 2}, module='torch.nn.functional')\nenum.global_enum(E)\n"),
    Attempt("next_enum_global_enum_torch", "nextjob",
            "import enum\nE = enum.Enum('E', {'matmul': 1, 'zeros': 2, 'rand': 3}, module='torch')\nenum.global_enum(E)\n"),
    Attempt("next_copy_slotstate_setattr_class", "nextjob",
            "import copy\ntarget = torch.nn.Linear\n"
            "def red(self, proto):\n    return (lambda: target, (), (None, {'forward': lambda self, x: x * 0}))\n"
            "G = type('G', (), {'__reduce' + '_ex__': red})\ncopy.deepcopy(G())\n"),
    Attempt("next_copy_slotstate_envoy_class", "nextjob",
            "import copy\ntarget = type(model)\n"
            "def red(self, proto):\n    return (lambda: target, (), (None, {'output': property(lambda self: torch.zeros(1))}))\n"
            "G = type('G', (), {'__reduce' + '_ex__': red})\ncopy.deepcopy(G())\n"),
    Attempt("next_copy_slotstate_tokenizer_class", "nextjob",
            "import copy\ntarget = type(model.tokenizer)\n"
            "def red(self, proto):\n    return (lambda: target, (), (None, {'model_input_names': ['nothing']}))\n"
            "G = type('G', (), {'__reduce' + '_ex__': red})\ncopy.deepcopy(G())\n"),
    Attempt("next_enum_global_enum_after_forward", "nextjob",
            "import enum\nlast = model.lm_head.output\n"
            "E = enum.Enum('E', {'softmax': 1, 'layer_norm': 2, 'embedding': 3}, module='torch.nn.functional')\n"
            "enum.global_enum(E)\n"),
    Attempt("next_enum_global_enum_masking_utils", "nextjob",
            "import enum\nlast = model.lm_head.output\n"
            "E = enum.Enum('E', {'create_causal_mask': 1, 'sdpa_mask': 2, 'eager_mask': 3}, module='transformers.masking_utils')\n"
            "enum.global_enum(E)\n"),
    Attempt("next_enum_global_enum_engine", "nextjob",
            "import enum\nlast = model.lm_head.output\n"
            "E = enum.Enum('E', {'save': 1, 'SaveRegistry': 2}, module='interlace.tracing.saving')\nenum.global_enum(E)\n"),
    Attempt("next_enum_global_enum_json", "nextjob",
            "import enum\nlast = model.lm_head.output\n"
            "E = enum.Enum('E', {'dumps': 1, 'loads': 2}, module='json')\nenum.global_enum(E)\n"),
    Attempt("next_tokenizer_add_special_tokens", "nextjob",
            "model.tokenizer.add_special_tokens({'additional_special_tokens': ['The', 'Tower']})\n"),
    Attempt("next_tokenizer_backend_add_tokens", "nextjob",
            "model.tokenizer.backend_tokenizer.add_tokens(['Eiffel', ' Eiffel'])\n"),
    Attempt("next_tokenizer_add_tokens", "nextjob", "model.tokenizer.add_tokens(['Eiffel', ' Eiffel', 'Tower', ' Tower'])\n"),
    Attempt("next_tokenizer_truncation", "nextjob", "model.tokenizer.backend_tokenizer.enable_truncation(2)\n"),
    Attempt("next_tokenizer_attribute", "nextjob", "model.tokenizer.model_max_length = 2\nmodel.tokenizer.truncation_side = 'left'\n"),
    Attempt("next_np_asarray_weight_view", "nextjob",
            "import numpy as np\na = np.asarray(model.lm_head.weight.detach())\na[:] = 0\n"),
    Attempt("next_from_dlpack_weight", "nextjob",
            "t = torch.from_dlpack(model.lm_head.weight.detach())\nt.mul_(0)\n"),
    Attempt("next_detach_inplace", "nextjob", "model.lm_head.weight.detach().mul_(0)\n"),
    Attempt("next_unbound_inplace", "nextjob", "torch.Tensor.mul_(model.lm_head.weight, 0)\n"),
    Attempt("next_out_argument", "nextjob", "w = model.lm_head.weight\ntorch.mul(w, 0, out=w)\n"),
    Attempt("next_modulelist_append", "nextjob", "model.transformer.h.append(torch.nn.Identity())\n"),
    Attempt("next_add_module", "nextjob", "model.transformer.h[0].add_module('mlp', torch.nn.Identity())\n"),
    Attempt("next_set_submodule", "nextjob", "model.transformer.set_submodule('ln_f', torch.nn.Identity())\n"),
    Attempt("next_register_parameter", "nextjob",
            "model.transformer.ln_f.register_parameter('weight', torch.nn.Parameter(torch.zeros(128)))\n"),
    Attempt("next_abc_register", "nextjob", "import collections.abc\ncollections.abc.Mapping.register(torch.Tensor)\n"),
    Attempt("next_config_dict_item", "nextjob", "model.config.id2label[0] = 'pwned'\nmodel.config.task_specific_params = {'x': 1}\n"),
    # --- resource exhaustion (bounded) --------------------------------------------------------
    Attempt("res_busy_loop", "resource",
            f"import time\nt0 = time.monotonic()\nwhile time.monotonic() - t0 < {_OVER}:\n    pass\n"
            "done = interlace.save('@DONE@')\n", hazard=True, wait=_OVER + 30),
    Attempt("res_pure_python_loop", "resource",
            "n = 0\nfor i in range(60_000_000):\n    n += 1\ndone = interlace.save('@DONE@')\n", hazard=True, wait=90),
    Attempt("res_sleep", "resource", f"import time\ntime.sleep({_OVER})\ndone = interlace.save('@DONE@')\n",
            hazard=True, wait=_OVER + 30),
    Attempt("res_torch_matmul_loop", "resource",
            f"import time\nt0 = time.monotonic()\na = torch.ones(512, 512)\nwhile time.monotonic() - t0 < {_OVER}:\n"
            "    a = (a @ a).clamp(0, 1)\ndone = interlace.save('@DONE@')\n", hazard=True, wait=_OVER + 30),
    Attempt("res_regex_backtracking", "resource",
            "import re\nre.match('(a+)+$', 'a' * 27 + 'b')\ndone = interlace.save('@DONE@')\n", hazard=True, needs_process=True, wait=120),
    Attempt("res_deep_recursion", "resource",
            "def f(n):\n    return f(n + 1) + 1\nf(0)\n", hazard=True, wait=60),
    Attempt("res_huge_allocation", "resource", "t = torch.empty(10**12)\ndone = interlace.save('@DONE@')\n",
            hazard=True, wait=60),
    Attempt("res_memory_growth", "resource",
            f"blocks = []\nfor i in range({(_MB + 1536) // 128}):\n    blocks.append(torch.ones(32 * 2**20))\n"
            "done = interlace.save('@DONE@')\n", hazard=True, wait=90),
    Attempt("res_print_flood", "resource",
            "line = 'x' * 1000\nfor i in range(20000):\n    print(line)\n",
            hazard=True, wait=90),
    Attempt("res_huge_result", "resource",
            f"big = torch.rand({LIMITS['max_result_bytes']}).save()\ndone = interlace.save('@DONE@')\n",
            hazard=True, wait=90),
    Attempt("res_deep_ast_validator", "resource", "x = " + "-" * 400 + "1\n", hazard=True, wait=60),
    # no loop, no function call of the job's own: nothing in the job's code where a limit is checked
    Attempt("res_straight_line_c_loop", "resource",
            "x = sum(range(6 * 10**8))\ndone = interlace.save('@DONE@')\n", hazard=True, needs_process=True, wait=90),
    Attempt("res_single_big_allocation", "resource",
            f"t = torch.ones({(LIMITS['max_memory_bytes'] + (1536 << 20)) // 4})\ndone = interlace.save('@DONE@')\n",
            hazard=True, needs_process=True, wait=90),
    Attempt("res_print_one_huge_line", "resource", "print('x' * 30_000_000)\n", hazard=True, wait=90),
    Attempt("res_deeply_nested_result", "resource",
            "x = []\nfor i in range(200000):\n    x = [x]\nleak = interlace.save(x)\n", hazard=True, wait=90),
    Attempt("res_segfault_ctypes", "resource",
            "import numpy as np\nnp.ctypeslib.ctypes.string_at(0)\n", hazard=True, wait=60),
    Attempt("res_segfault_as_strided", "resource",
            "t = torch.ones(4)\nu = t.as_strided((4,), (1,), 10**12)\nleak = interlace.save(float(u.sum()))\n",
            hazard=True, wait=60),
    # --- another user's data --------------------------------------------------------------------
    Attempt("data_read_database_torch", "otherdata",
            "leak = torch.from_file('@DATA@/interlace.db', size=64, dtype=torch.uint8).save()\n"),
    Attempt("data_read_database_numpy", "otherdata",
            "import numpy as np\nleak = torch.from_numpy(np.fromfile('@DATA@/interlace.db', dtype=np.uint8, count=64)).save()\n"),
    Attempt("data_read_other_user_file", "otherdata",
            "import numpy as np\nleak = interlace.save(str(np.loadtxt('@DATACANARY@', dtype=str)))\n"),
    Attempt("data_read_database_os", "otherdata",
            "import random\no = random._os\nfd = o.open('@DATA@/interlace.db', o.O_RDONLY)\nleak = interlace.save(o.read(fd, 64))\n"),
    Attempt("data_list_results_dir", "otherdata",
            "import random\nleak = interlace.save(str(random._os.listdir('@DATA@')) + random._os.environ.get('@ENV@', ''))\n"),
    Attempt("data_proc_server_environ", "otherdata",
            "import numpy as np\nleak = torch.from_numpy(np.fromfile('/proc/@PID@/environ', dtype=np.uint8)).save()\n"),
    Attempt("data_proc_self_environ", "otherdata",
            "leak = torch.from_file('/proc/self/environ', size=4000, dtype=torch.uint8).save()\n"),
    Attempt("data_proc_parent_environ_ds", "otherdata",
            "import numpy as np\nleak = interlace.save(np.DataSource(None).open('/proc/@PID@/environ').read())\n"),
    Attempt("data_server_log", "otherdata",
            "import numpy as np\nleak = interlace.save(np.DataSource(None).open('@DATA@/server.log').read()[-4000:])\n"
            "other = interlace.save(np.DataSource(None).open('@DATACANARY@').read())\n"),
    Attempt("data_torch_load_db", "otherdata",
            "leak = interlace.save(torch.load('@DATA@/interlace.db', weights_only=False))\n"),
    Attempt("data_apikey_in_config", "otherdata",
            "import interlace.config\nleak = interlace.save(interlace.config.CONFIG.API.APIKEY)\n"),
    Attempt("data_rec_fromfile", "otherdata",
            "import numpy as np\nleak = interlace.save(str(np.rec.fromfile('@CANARY@', formats='S30', shape=1)))\n"),
    Attempt("data_fromregex", "otherdata",
            "import numpy as np\nleak = interlace.save(str(np.fromregex('@CANARY@', '(.*)', [('a', 'S40')])))\n"),
    Attempt("data_config_from_json_file", "otherdata",
            "c = model.config.from_json_file('@JCANARY@')\nleak = interlace.save(str(c.to_dict()))\n"),
    Attempt("data_config_from_pretrained_dir", "otherdata",
            "c = model.config.from_pretrained('@JDIR@')\nleak = interlace.save(str(c.to_dict()))\n"),
    Attempt("data_aten_from_file_dynamic", "otherdata",
            "op = getattr(torch.ops.aten, 'from' + '_file')\nleak = op('@CANARY@', None, 30, dtype=torch.uint8).save()\n"),
    Attempt("data_env_through_torch", "otherdata", "leak = interlace.save(torch.os.environ.get('@ENV@'))\n"),
]
