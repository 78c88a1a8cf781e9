// SPDX-License-Identifier: GPL-2.0
/*
 * A plain test module: kmm_ci_b (the soft dependency of the soft-dependency lab) and
 * every module of the test world that has no source of its own are built from this file
 * under their own name. It records when it was loaded (in jiffies,
 * /sys/module/<name>/parameters/loaded_at) so tests can check the load order.
 */
#include <linux/init.h>
#include <linux/jiffies.h>
#include <linux/module.h>

#ifndef KMM_CI_VERSION
#define KMM_CI_VERSION "1.0"
#endif

static unsigned long loaded_at;
module_param(loaded_at, ulong, 0444);
MODULE_PARM_DESC(loaded_at, "jiffies when the module was loaded");

static int __init kmm_generic_init(void)
{
	loaded_at = jiffies;
	pr_info("%s: Hello, World! version %s\n", KBUILD_MODNAME, KMM_CI_VERSION);
	return 0;
}

static void __exit kmm_generic_exit(void)
{
	pr_info("%s: Goodbye, World!\n", KBUILD_MODNAME);
}

module_init(kmm_generic_init);
module_exit(kmm_generic_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmm-fleet test module");
MODULE_VERSION(KMM_CI_VERSION);
