// SPDX-License-Identifier: GPL-2.0
/*
 * kmm_ci_fw: a module that needs firmware. Its init asks the kernel for
 * kmm_ci_fw.bin (found through the firmware search path, e.g. the loader's
 * KMM_FIRMWARE_HOST_PATH) and fails with the kernel's error when it is missing.
 * The firmware's size is in /sys/module/kmm_ci_fw/parameters/firmware_size.
 */
#include <linux/device.h>
#include <linux/firmware.h>
#include <linux/init.h>
#include <linux/module.h>
#include <linux/platform_device.h>

#ifndef KMM_CI_VERSION
#define KMM_CI_VERSION "1.0"
#endif

static unsigned long firmware_size;
module_param(firmware_size, ulong, 0444);
MODULE_PARM_DESC(firmware_size, "size of the firmware loaded at init");

static int __init kmm_ci_fw_init(void)
{
	struct platform_device *pdev;
	const struct firmware *fw;
	int err;

	pdev = platform_device_register_simple("kmm_ci_fw", -1, NULL, 0);
	if (IS_ERR(pdev))
		return PTR_ERR(pdev);
	err = request_firmware(&fw, "kmm_ci_fw.bin", &pdev->dev);
	platform_device_unregister(pdev);
	if (err) {
		pr_err("kmm_ci_fw: firmware kmm_ci_fw.bin not found: %d\n", err);
		return err;
	}
	firmware_size = fw->size;
	release_firmware(fw);
	pr_info("kmm_ci_fw: loaded firmware kmm_ci_fw.bin (%lu bytes), version %s\n",
		firmware_size, KMM_CI_VERSION);
	return 0;
}

static void __exit kmm_ci_fw_exit(void)
{
	pr_info("kmm_ci_fw: Goodbye, World!\n");
}

module_init(kmm_ci_fw_init);
module_exit(kmm_ci_fw_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmm-fleet lab module that requests firmware");
MODULE_VERSION(KMM_CI_VERSION);
MODULE_FIRMWARE("kmm_ci_fw.bin");
