// SPDX-License-Identifier: GPL-2.0
/*
 * kmm_ci_a: the labs' module, as a real kernel module. It registers the misc device
 * /dev/kmm_ci_a (a process holding it open keeps the module in use, as a device plugin
 * holding its device does) and reports its version in /sys/module/kmm_ci_a/version.
 */
#include <linux/fs.h>
#include <linux/init.h>
#include <linux/miscdevice.h>
#include <linux/module.h>

#ifndef KMM_CI_VERSION
#define KMM_CI_VERSION "1.0"
#endif

static const struct file_operations kmm_ci_a_fops = {
	.owner = THIS_MODULE,
};

static struct miscdevice kmm_ci_a_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "kmm_ci_a",
	.fops = &kmm_ci_a_fops,
	.mode = 0444,
};

static int __init kmm_ci_a_init(void)
{
	int err = misc_register(&kmm_ci_a_dev);

	if (err)
		return err;
	pr_info("kmm_ci_a: Hello, World! version %s\n", KMM_CI_VERSION);
	return 0;
}

static void __exit kmm_ci_a_exit(void)
{
	misc_deregister(&kmm_ci_a_dev);
	pr_info("kmm_ci_a: Goodbye, World!\n");
}

module_init(kmm_ci_a_init);
module_exit(kmm_ci_a_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmm-fleet lab module A");
MODULE_VERSION(KMM_CI_VERSION);
