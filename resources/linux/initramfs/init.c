/*
 * /init of the initramfs resources/linux/make-initramfs builds: a static program that runs
 * as PID 1 of a stock kernel under irvm, reports the interrupt-remapping state the kernel
 * shows user space, and ends the run with a verdict on irvm's debug-exit port (0x501,
 * docs/boot-protocol.md): 0 when every IOAPIC interrupt in use is remapped, the DMAR
 * unit's fault interrupt is there and the ACPI DMAR table is visible, and (when the kernel
 * was booted with intel_iommu=on) every PCI device is in an IOMMU group behind dmar0 with
 * a translated (DMA) default domain; 1 otherwise.
 *
 * Every line it prints starts with "init: "; the last is "init: verdict PASS" or
 * "init: verdict FAIL (why)". It waits for the console to drain (tcdrain) before the
 * verdict, so the report is in the log when the run ends.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#define DEBUG_EXIT 0x501

static void say(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	if (write(1, "init: ", 6) < 0 || write(1, line, n) < 0)
		return;
}

/* Reads a whole (small) file into buf; returns its length or -1. */
static int slurp(const char *path, char *buf, int size)
{
	int fd = open(path, O_RDONLY), len = 0, n;

	if (fd < 0)
		return -1;
	while (len < size - 1 && (n = read(fd, buf + len, size - 1 - len)) > 0)
		len += n;
	close(fd);
	buf[len] = 0;
	return len;
}

static void chomp(char *s)
{
	size_t n = strlen(s);

	while (n && (s[n - 1] == '\n' || s[n - 1] == ' '))
		s[--n] = 0;
}

static void finish(int verdict, const char *why)
{
	if (verdict)
		say("verdict FAIL (%s)", why);
	else
		say("verdict PASS");
	tcdrain(1);
	if (ioperm(DEBUG_EXIT, 1, 1) == 0)
		outb(verdict, DEBUG_EXIT);
	say("no debug-exit port (ioperm failed): powering off");
	tcdrain(1);
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

/*
 * DMA remapping as the kernel shows it: each PCI device's IOMMU group and that group's
 * default domain type. Returns how many devices are behind dmar0 in a translated domain;
 * *devices gets how many PCI devices there are.
 */
static int dma_remapping(int *devices)
{
	char path[600], link[256], type[64], *group;
	struct dirent *d;
	DIR *pci = opendir("/sys/bus/pci/devices");
	int translated = 0;
	ssize_t n;

	*devices = 0;
	say("DMA remapping unit: %s",
	    access("/sys/class/iommu/dmar0", F_OK) == 0 ? "dmar0 registered" : "none registered");
	while (pci && (d = readdir(pci))) {
		if (d->d_name[0] == '.')
			continue;
		(*devices)++;
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", d->d_name);
		n = readlink(path, link, sizeof(link) - 1);
		if (n <= 0) {
			say("pci %s: no IOMMU group", d->d_name);
			continue;
		}
		link[n] = 0;
		group = strrchr(link, '/');
		group = group ? group + 1 : link;
		snprintf(path, sizeof(path), "/sys/kernel/iommu_groups/%s/type", group);
		if (slurp(path, type, sizeof(type)) < 0)
			strcpy(type, "?");
		chomp(type);
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu", d->d_name);
		n = readlink(path, link, sizeof(link) - 1);
		link[n > 0 ? n : 0] = 0;
		say("pci %s: IOMMU group %s, default domain %s, unit %s", d->d_name, group, type,
		    n > 0 && strstr(link, "dmar0") ? "dmar0" : "?");
		if (!strncmp(type, "DMA", 3) && n > 0 && strstr(link, "dmar0"))
			translated++;
	}
	if (pci)
		closedir(pci);
	return translated;
}

int main(void)
{
	static char buf[65536];
	char path[320], chip[64], hwirq[32], actions[128], *line, *save;
	int remapped = 0, plain = 0, dmar_msi = 0, ir_msi = 0, n;
	struct dirent *d;
	DIR *irqs;

	if (open("/dev/console", O_RDWR) < 0 && fcntl(1, F_GETFD) < 0)
		return 1;
	say("stock kernel reached user space");
	mkdir("/proc", 0555);
	mkdir("/sys", 0555);
	if (mount("proc", "/proc", "proc", 0, NULL) || mount("sysfs", "/sys", "sysfs", 0, NULL))
		finish(1, "cannot mount /proc and /sys");

	if (slurp("/proc/interrupts", buf, sizeof(buf)) < 0)
		finish(1, "no /proc/interrupts");
	for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		say("interrupts: %s", line);
		if (strstr(line, "IR-IO-APIC"))
			remapped++;
		else if (strstr(line, "IO-APIC"))
			plain++;
		if (strstr(line, "DMAR-MSI"))
			dmar_msi++;
		if (strstr(line, "IR-PCI-MSI"))
			ir_msi++;
	}

	irqs = opendir("/sys/kernel/irq");
	while (irqs && (d = readdir(irqs))) {
		if (d->d_name[0] < '0' || d->d_name[0] > '9')
			continue;
		snprintf(path, sizeof(path), "/sys/kernel/irq/%s/actions", d->d_name);
		if (slurp(path, actions, sizeof(actions)) <= 1)
			continue; /* no handler: not in use */
		snprintf(path, sizeof(path), "/sys/kernel/irq/%s/chip_name", d->d_name);
		slurp(path, chip, sizeof(chip));
		snprintf(path, sizeof(path), "/sys/kernel/irq/%s/hwirq", d->d_name);
		slurp(path, hwirq, sizeof(hwirq));
		chomp(chip);
		chomp(hwirq);
		chomp(actions);
		say("irq %s: chip %s, hwirq %s, handlers %s", d->d_name, chip, hwirq, actions);
	}
	if (irqs)
		closedir(irqs);

	n = slurp("/sys/firmware/acpi/tables/DMAR", buf, 64);
	say("ACPI DMAR table: %s", n >= 4 && !memcmp(buf, "DMAR", 4) ? "present" : "missing");
	say("summary: %d remapped IOAPIC interrupts (IR-IO-APIC), %d not remapped (IO-APIC), "
	    "%d remapped MSIs (IR-PCI-MSI), %d DMAR fault interrupts (DMAR-MSI)",
	    remapped, plain, ir_msi, dmar_msi);

	if (n < 4 || memcmp(buf, "DMAR", 4))
		finish(1, "no ACPI DMAR table");
	if (slurp("/proc/cmdline", buf, sizeof(buf)) > 0 && strstr(buf, "intel_iommu=on")) {
		int devices, translated = dma_remapping(&devices);

		say("DMA remapping: %d of %d PCI devices in translated domains behind dmar0",
		    translated, devices);
		if (!devices || translated != devices)
			finish(1, "a PCI device is not behind DMA remapping");
	}
	if (!remapped)
		finish(1, "no remapped IOAPIC interrupt");
	if (plain)
		finish(1, "an IOAPIC interrupt is not remapped");
	if (!dmar_msi)
		finish(1, "no DMAR fault interrupt");
	finish(0, NULL);
	return 0;
}
